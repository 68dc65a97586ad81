"""The multi-task model: one shared backbone, one head per task; saving, loading and prediction."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.ao.quantization import quantize_dynamic
from torch.nn import functional as F

from multitune.adapters import AdapterConfig, AdapterSet
from multitune.backbones.architectures import ARCHITECTURES, architecture_for
from multitune.backbones.checks import (
    SAVED_MODEL_CODE,
    check_max_length,
    check_safetensors_files,
    load_tokenizer,
    read_json_file,
    read_model_config,
)
from multitune.backbones.loading import check_tokenizer_files, load_exported_backbone, quiet_loading
from multitune.backbones.pooling import pool
from multitune.backbones.sentence_transformers import write_sentence_transformers_layout
from multitune.config.parse import from_dict, to_dict
from multitune.data.batches import feature_length, length_batches
from multitune.errors import ConfigError, InputError, MultituneError
from multitune.fileio import write_json_atomic
from multitune.model_format import (  # noqa: F401  (the file names are part of this module's API)
    ADAPTERS_FILE,
    BACKBONE_DIR,
    FORMAT_VERSION,
    HEADS_FILE,
    MODEL_FILE,
    check_metadata,
    load_weights,
    restore_tasks,
)
from multitune.registry import Registry
from multitune.tasks.base import EncoderCall, Task, TaskOutput, prediction_examples
from multitune.tasks.mixed import predict_mixed

INFERENCE_PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class ModelFormat:
    """A model directory format that :func:`load` reads besides :class:`MultiTaskModel`'s own, registered in
    :data:`MODEL_FORMATS` by the package that reads it.

    Attributes:
        is_model_dir: ``(path) -> bool``: whether ``path`` is a directory of this format.
        load: ``(path, device=..., precision=...) -> model``: the model, with the inference API of
            :class:`MultiTaskModel` (``predict``, ``predict_mixed``, ``embed_texts``).
    """

    is_model_dir: Callable[[str | Path], bool]
    load: Callable[..., Any]


#: the other model formats :func:`load` reads, by name; ``multitune.onnx`` registers ``onnx`` (ONNX Runtime)
#: and is imported on the first lookup (plugin loading, see :mod:`multitune.registry`)
MODEL_FORMATS: Registry[ModelFormat] = Registry("model format", plugins=["multitune.onnx"])


class _SharedStates:
    """The token states of one backbone pass over several ``encode`` calls' inputs, handed out call by call
    (:meth:`MultiTaskModel.shared_encoding`)."""

    def __init__(self, calls: Sequence[EncoderCall], states: torch.Tensor):
        self.calls = list(calls)
        self.states = states.split([len(ids) for ids, _, _ in self.calls])
        self.taken = 0

    def take(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
             ) -> torch.Tensor:
        if self.taken == len(self.calls) or not all(
                a is b or (a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b)))
                for a, b in zip(self.calls[self.taken], (input_ids, attention_mask, token_type_ids))):
            raise MultituneError(f"encode call {self.taken + 1} inside a shared backbone pass is not the one its "
                                 f"task declared (Task.encoder_inputs must list the encode calls of the task's "
                                 f"forward pass, in order)")
        states = self.states[self.taken][:, :input_ids.shape[1]]
        self.taken += 1
        return states


class MultiTaskModel(nn.Module):
    """A transformers backbone shared by every task, plus each task's head.

    Args:
        backbone: a transformers encoder, encoder-decoder (``AutoModelForSeq2SeqLM``) or causal LM.
        tasks: task name -> task (already ``setup`` with its labels); each is bound to the backbone's family.
        tokenizer: the backbone's tokenizer (used by :meth:`predict` and :meth:`save`).
        pooling: ``mean``, ``cls``, ``max`` or ``last`` (default: the family's, mean or last).
        normalize_embeddings: L2-normalise the sentence embeddings of :meth:`embed`.
        max_length: truncation length used for prediction.
        architecture: the backbone family (``encoder``, ``encoder_decoder``, ``decoder_only``); read from the
            model when omitted.
        adapters: the ``adapters`` section: parameter-efficient adapters attached to the backbone and routed
            per task (see :class:`multitune.adapters.AdapterSet`).

    Raises:
        ConfigError: a task cannot run on this backbone family, or ``max_length`` is longer than the backbone's
            position embeddings (named ``training.max_length``).
    """

    def __init__(self, backbone: nn.Module, tasks: dict[str, Task], tokenizer: Any = None,
                 pooling: str | None = None, normalize_embeddings: bool = False, max_length: int = 128,
                 architecture: str | None = None, adapters: Any = None):
        super().__init__()
        self.backbone = backbone
        self.tasks = dict(tasks)
        self.tokenizer = tokenizer
        self.architecture = architecture_for(backbone, tokenizer, architecture)
        # here, not at the first long example: a longer input runs past the position embeddings mid-training
        check_max_length(backbone.config, max_length, "training.max_length")
        self.pooling = pooling or self.architecture.default_pooling
        self.normalize_embeddings = normalize_embeddings
        self.max_length = max_length
        for task in self.tasks.values():
            task.bind(self.architecture, tokenizer)
        self.hidden_size = self.architecture.hidden_size(backbone)
        self.heads = nn.ModuleDict({name: task.build_head(self.hidden_size) for name, task in tasks.items()})
        for name, task in self.tasks.items():
            task.warm_start_head(self.heads[name], backbone)
        self.inference_precision = "fp32"
        self.unpadded = False  # training.unpadded: the encoder on real tokens only (multitune.backbones.unpadded)
        self._shared: _SharedStates | None = None  # inside shared_encoding: the states encode hands out
        self.adapters = None
        if adapters is not None:
            self.adapters = AdapterSet(adapters, backbone, self.architecture, list(self.tasks))

    def route(self, task: str | Sequence[str] | None):
        """Context in which the backbone runs with ``task``'s adapter (a name per row for a mixed batch)."""
        return self.adapters.route(task) if self.adapters is not None else contextlib.nullcontext()

    def shares_backbone(self, tasks: Sequence[str]) -> bool:
        """Whether the backbone computes the same token states for every task of ``tasks``, so that one pass can
        serve them all: without adapters, or when all of them use one adapter with no per-task conditioning (a
        ``shared`` arrangement; not per-task adapters, task embeddings or AdapterFusion)."""
        a = self.adapters
        if a is None:
            return True
        return a.task_embeddings is None and a.fusion is None and len({a.assignment[t] for t in tasks}) == 1

    @contextlib.contextmanager
    def shared_encoding(self, calls: Sequence[EncoderCall], tasks: Sequence[str]) -> Iterator[None]:
        """One backbone pass for the ``encode`` calls of several tasks' forward passes (a training step that
        holds a batch of every task, see :mod:`multitune.training.multistep`).

        The calls' inputs (right-padded, as the collators pad them) are padded to the longest, concatenated
        along the batch and encoded at once; inside the block each :meth:`encode` call (:meth:`embed` makes
        one) gets the next call's rows of that pass, cut back to its own length, so that heads, pooling and
        losses run as on a pass of their own. A row's real tokens attend to real tokens only, so their states
        do not depend on the padding added (up to the rounding of kernels of another shape); a task's loss
        back-propagates into the backbone through its own rows.

        Args:
            calls: every ``(input_ids, attention_mask, token_type_ids or None)`` the block will encode, in order
                (:meth:`~multitune.tasks.base.Task.encoder_inputs` of each task served).
            tasks: the tasks served; they must share the backbone (:meth:`shares_backbone`).

        Raises:
            MultituneError: the tasks do not share the backbone, or the blocks nest; inside the block, an
                ``encode`` call other than the next of ``calls``; leaving the block with calls not made.
        """
        if not self.shares_backbone(tasks) or self._shared is not None:
            raise MultituneError(f"tasks {', '.join(tasks)} cannot share one backbone pass (per-task adapters, "
                                 f"or a shared pass already open)")
        width = max(ids.shape[1] for ids, _, _ in calls)
        # the positions added are masked out: no real token attends to them, whatever their id
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0

        def joined(parts: list[torch.Tensor], value: int) -> torch.Tensor:
            return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in parts])

        types = None
        if any(tt is not None for _, _, tt in calls):
            types = joined([torch.zeros_like(ids) if tt is None else tt for ids, _, tt in calls], 0)
        with self.route(tasks[0]):
            states = self.encode(joined([c[0] for c in calls], pad_id), joined([c[1] for c in calls], 0), types)
        self._shared = _SharedStates(calls, states)
        try:
            yield
            if self._shared.taken < len(calls):
                raise MultituneError(f"a shared backbone pass encoded {len(calls)} inputs and its tasks used "
                                     f"{self._shared.taken} (Task.encoder_inputs must list the encode calls of "
                                     f"the task's forward pass)")
        finally:
            self._shared = None

    # -- building blocks used by tasks -----------------------------------------------------
    def encode(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Token states [batch, tokens, hidden] for head tasks (the encoder's on an encoder-decoder); inside
        :meth:`shared_encoding`, this call's rows of the shared pass."""
        if self._shared is not None:
            return self._shared.take(input_ids, attention_mask, token_type_ids)
        # a mixed-task batch (adapters routed per row) runs padded: the adapters' hooks pick per padded row
        unpadded = self.unpadded and not (self.adapters is not None and self.adapters.router.per_row)
        states = self.architecture.hidden_states(self.backbone, input_ids, attention_mask, token_type_ids,
                                                 unpadded=unpadded)
        # a bf16 inference backbone hands fp32 states to the heads (autocast training keeps its own dtypes)
        return states.float() if self.inference_precision == "bf16" else states

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden, attention_mask, self.pooling)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Sentence embeddings: pooled token states, L2-normalised when configured."""
        emb = self.pool(self.encode(input_ids, attention_mask, token_type_ids), attention_mask)
        return F.normalize(emb, dim=-1) if self.normalize_embeddings else emb

    def input_embedding_weight(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight

    def forward(self, task: str, batch: dict[str, torch.Tensor]) -> TaskOutput:
        with self.route(task):
            return self.tasks[task].forward(self, self.heads[task], batch)

    def infer(self, task: str, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """The task's inference outputs for a batch (generation for text-to-text), through its adapter."""
        with self.route(task):
            return self.tasks[task].infer(self, self.heads[task], batch)

    def set_inference_precision(self, precision: str) -> None:
        """Make inference cheaper, for prediction and serving only (never train afterwards):

        - ``bf16``: the backbone's weights in bfloat16 (heads and adapters stay fp32; states are cast at the
          boundary). Pays on GPUs and on CPUs with AVX512-BF16 or AMX.
        - ``int8``: dynamic int8 quantisation of the backbone's linear layers (weights int8, activations
          quantised per batch), for CPUs without bf16. Not for adapter models, whose hooks sit on those
          layers: merge a LoRA first (``multitune export --merge``).

        The accuracy cost of both is measured by ``bench/perf.py`` (see docs/performance.md).

        Raises:
            MultituneError: an unknown precision, or int8 on a model with adapters.
        """
        if precision not in INFERENCE_PRECISIONS:
            raise MultituneError(f"precision: expected one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
        if precision == "bf16":
            self.backbone.to(torch.bfloat16)
        elif precision == "int8":
            if self.adapters is not None:
                raise MultituneError("precision int8 quantises the backbone's linear layers, where the adapters "
                                     "attach; export the task with --merge first, or use bf16")
            self.backbone.to("cpu")  # dynamic quantisation runs on the CPU
            with warnings.catch_warnings():  # torch.ao's deprecation notices; the kernels work in this torch
                warnings.simplefilter("ignore")
                quantize_dynamic(self.backbone, {nn.Linear}, dtype=torch.qint8, inplace=True)
        self.inference_precision = precision
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- inference -------------------------------------------------------------------------
    def _batches(self, task: Task, examples: list[dict], batch_size: int):
        """Yield (indices, batch) in length order, so that padding is small, at most ``batch_size`` rows and
        :data:`~multitune.data.batches.EVAL_BATCH_TOKENS` padded tokens a batch; callers restore order."""
        feats = task.encode(examples, self.tokenizer, self.max_length)
        pad_id = self.tokenizer.pad_token_id or 0
        start = 0
        for idx in length_batches([feature_length(f) for f in feats], batch_size):
            batch = task.collate([feats[i] for i in idx], pad_id, torch.Generator().manual_seed(start))
            start += len(idx)
            yield idx, {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def predict(self, task: str, inputs: Sequence[Any], batch_size: int = 64) -> list[dict]:
        """Predict for raw inputs: strings, (text, text_pair) tuples or example dicts.

        Returns:
            One JSON-able dict per input: ``label``/``scores`` for classification, ``entities`` for
            token classification, ``score`` for regression, ``text`` for text-to-text.

        One prediction per input, in input order. Inputs are checked first: an empty text, or a single text for
        a task trained on pairs (or a pair for any other task), is an error naming ``inputs[i]``.

        Raises:
            MultituneError: the model has no task called ``task``.
            InputError: a malformed input, or one of the wrong form for the task.
        """
        if task not in self.tasks:
            raise MultituneError(f"the model has no task {task!r}; its tasks: {', '.join(self.tasks)}")
        t = self.tasks[task]
        examples = prediction_examples(task, t, inputs)
        if not examples:
            return []
        was_training = self.training
        self.eval()
        out: list[Any] = [None] * len(examples)
        try:
            for idx, batch in self._batches(t, examples, batch_size):
                preds = t.decode(self.infer(task, batch), batch, [examples[i] for i in idx])
                for i, p in zip(idx, preds):
                    out[i] = p
        finally:
            self.train(was_training)
        return out

    def predict_mixed(self, requests: Sequence[tuple[str, Any]]) -> list[dict]:
        """Predict one mixed-task batch of ``(task, input)`` pairs: rows of head tasks share one backbone
        pass, each through its own adapter and head (see :mod:`multitune.tasks.mixed`)."""
        return predict_mixed(self, requests)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64, task: str | None = None) -> torch.Tensor:
        """Sentence embeddings of ``texts`` [n, hidden] (pooling and normalisation as configured), through
        ``task``'s adapter when the model has adapters (default: the shared adapter, else none)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"texts[{i}]: " + ("is empty" if isinstance(text, str) else
                                                    f"expected a text, got {type(text).__name__}"))
        self.eval()
        out = torch.zeros(len(texts), self.hidden_size)
        enc_order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), batch_size):
            idx = enc_order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with self.route(task):
                emb = self.embed(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
            out[idx] = emb.float().cpu()
        return out

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None, weights: dict | None = None) -> None:
        """Write a directory any user can reload (the caller writes into a temporary directory and renames it,
        see the trainer):

        - ``backbone/``: the backbone via ``save_pretrained`` (safetensors) with its tokenizer;
        - ``heads.safetensors`` (and ``adapters.safetensors``) and ``multitune.json`` (tasks, label maps,
          pooling);
        - for an encoder without adapters, the sentence-transformers layout (``modules.json``, pooling and
          normalisation modules), so that ``SentenceTransformer(path)`` computes exactly :meth:`embed_texts`.

        The directory has no ``config.json`` at its top: stock task classes refuse it instead of loading a
        newly initialised head. One task at a time leaves multitune as a stock model through
        ``multitune export`` (:mod:`multitune.export`).

        ``weights``: the full state dict to write instead of the modules' own (a model sharded by FSDP, whose
        own are shards; gathered by :func:`multitune.training.distributed.full_state_dict`).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)

        def part(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
            if weights is None:
                return module.state_dict()
            return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

        backbone_dir = path / BACKBONE_DIR
        self.backbone.save_pretrained(backbone_dir, safe_serialization=True,
                                      state_dict=None if weights is None else part(self.backbone, "backbone."))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(backbone_dir)
        heads = {k: v.detach().cpu().contiguous() for k, v in part(self.heads, "heads.").items()}
        save_file(heads, str(path / HEADS_FILE), metadata={"format": "multitune-heads"})
        if self.adapters is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in part(self.adapters, "adapters.").items()}
            save_file(state, str(path / ADAPTERS_FILE), metadata={"format": "multitune-adapters"})
        if self.adapters is None and self.architecture.type_name == "encoder":
            write_sentence_transformers_layout(path, BACKBONE_DIR, self.pooling, self.normalize_embeddings,
                                               self.max_length, self.hidden_size)
        write_json_atomic(path / MODEL_FILE, {**self.metadata(), **(extra or {})})

    def metadata(self) -> dict:
        """The content of ``multitune.json``: format, backbone family, pooling, tasks with their configs and
        states, adapters."""
        tasks = {}
        for name, task in self.tasks.items():
            cfg = to_dict(task.config)
            cfg.pop("data", None)
            tasks[name] = {"config": cfg, "state": task.state()}
        return {
            "format_version": FORMAT_VERSION, "backbone_type": self.architecture.type_name, "pooling": self.pooling,
            "normalize_embeddings": self.normalize_embeddings, "max_length": self.max_length,
            "tasks": tasks, **({"adapters": {**to_dict(self.adapters.config), "sites": self.adapters.site_paths}}
                               if self.adapters is not None else {})}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None,
             trust_remote_code: bool = False, precision: str = "fp32") -> MultiTaskModel:
        """Load a directory written by :meth:`save`; ``precision`` as :meth:`set_inference_precision`.

        Raises:
            MultituneError: the directory is missing files or is not a multitune model.
        """
        import transformers  # imported only when used: 0.5 s

        path = Path(path)
        if not path.exists():
            raise MultituneError(f"{path}: does not exist (expected a run directory or a model directory)")
        if (path / "model" / MODEL_FILE).is_file():  # a run directory
            path = path / "model"
        file = path / MODEL_FILE
        if not file.is_file():
            raise MultituneError(f"{path}: not a multitune model directory (missing {MODEL_FILE})")
        meta = read_json_file(file, "the model's metadata")
        check_metadata(meta, file)
        export = meta.get("export")
        # where the backbone lives: BACKBONE_DIR (format 2), the top (format 1), or inside a task model (export)
        weights_dir = path if export or meta.get("format_version", 1) < 2 else path / BACKBONE_DIR
        rel = weights_dir.relative_to(path)
        missing = [str(f) for f in (Path(HEADS_FILE), rel / "config.json", rel / "model.safetensors")
                   if not (path / f).is_file()]
        if missing:
            raise MultituneError(f"{path}: not a multitune model directory (missing {', '.join(missing)})")
        tasks = restore_tasks(meta, file)
        if not export:  # an export's config.json is its task model's; the export entry rebuilds the backbone
            read_model_config(weights_dir, trust_remote_code, remote_code=SAVED_MODEL_CODE)
        try:
            check_tokenizer_files(weights_dir, "")
        except ConfigError as exc:
            raise MultituneError(str(exc)) from None
        tokenizer = load_tokenizer(weights_dir, trust_remote_code)
        for directory in dict.fromkeys((path, weights_dir)):  # heads (and adapters), then the backbone's weights
            check_safetensors_files(directory)
        family = meta.get("backbone_type", "encoder")
        auto_class = getattr(transformers, ARCHITECTURES.get(family, f"{file}: backbone_type").auto_class)
        if export:
            backbone = load_exported_backbone(path, export, auto_class)
        else:
            try:
                with quiet_loading():  # no "Loading weights" bar from a library call
                    backbone = auto_class.from_pretrained(weights_dir, use_safetensors=True,
                                                          trust_remote_code=trust_remote_code)
            except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
                raise MultituneError(f"{weights_dir}: cannot load the backbone: "
                                     f"{' '.join(str(exc).split())[:300]}") from None
        try:
            check_max_length(backbone.config, meta["max_length"], "max_length")
        except ConfigError as exc:
            raise MultituneError(f"{file}: {exc}") from None
        adapters = None
        try:
            if meta.get("adapters"):
                entry = dict(meta["adapters"])
                sites = entry.pop("sites")
                adapters = from_dict(AdapterConfig, entry, "adapters")
            model = cls(backbone, tasks, tokenizer, meta["pooling"], meta["normalize_embeddings"],
                        meta["max_length"], architecture=family, adapters=adapters)
        except ConfigError as exc:
            raise MultituneError(f"{file}: {exc}") from None
        load_weights(model.heads, path / HEADS_FILE)
        if adapters is not None:
            if model.adapters.site_paths != sites or not (path / ADAPTERS_FILE).is_file():
                raise MultituneError(f"{path}: the adapters do not match this backbone (or {ADAPTERS_FILE} "
                                     f"is missing)")
            load_weights(model.adapters, path / ADAPTERS_FILE)
        model.eval()
        if device is not None:
            model.to(device)
        if precision != "fp32":
            model.set_inference_precision(precision)
        return model


def load(path: str | Path, device: str | torch.device | None = None, precision: str = "fp32") -> MultiTaskModel:
    """Load a trained multitune model (a run directory or its ``model/`` directory); ``precision`` ``bf16`` or
    ``int8`` makes inference cheaper (see :meth:`MultiTaskModel.set_inference_precision`).

    A directory of another format registered in :data:`MODEL_FORMATS` (an ONNX export) loads as that format's
    model, with the same inference API.

    Example:
        >>> model = multitune.load("runs/quickstart")
        >>> model.predict("sentiment", ["a wonderful film"])
    """
    for name in MODEL_FORMATS.names():
        fmt = MODEL_FORMATS.get(name)
        if fmt.is_model_dir(path):
            return fmt.load(path, device=device, precision=precision)
    return MultiTaskModel.load(path, device=device, precision=precision)
