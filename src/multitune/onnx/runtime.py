"""Run an exported ONNX model on onnxruntime with the inference API of :class:`~multitune.model.MultiTaskModel`.

The tasks are rebuilt from ``multitune.json`` and each prediction goes through the task's own code
(``example_from_input``, ``encode``, ``collate``, ``decode``); only the backbone and heads run in the graph.
A batch of several tasks is one graph run over the distinct token rows of all of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitune.backbones.architectures import architecture_for
from multitune.backbones.loading import check_tokenizer_files
from multitune.errors import ConfigError, MultituneError
from multitune.model import MODEL_FORMATS, ModelFormat, restore_tasks
from multitune.onnx.files import (
    FROM_EMBEDDINGS,
    GRAPH_FILE,
    IN_GRAPH,
    ONNX_FORMAT,
    ONNX_META_FILE,
    SENTENCE_EMBEDDING,
    require,
)
from multitune.tasks.base import Task, TaskOutput, pad, prediction_examples

MODEL_FILE = "multitune.json"


def is_onnx_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`~multitune.onnx.export.export_onnx`.

    Args:
        path: any path.

    Returns:
        True when it holds ``model.onnx``, ``onnx.json`` and ``multitune.json``.
    """
    path = Path(path)
    return all((path / name).is_file() for name in (GRAPH_FILE, ONNX_META_FILE, MODEL_FILE))


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MultituneError(f"{file}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise MultituneError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise MultituneError(f"{file}: expected a JSON object")
    return data


@dataclass
class _Call:
    """Token rows whose graph outputs one task needs: its own outputs, or sentence embeddings."""

    outputs: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None


class _EmbeddingPass:
    """Stands in for the model inside the inference of a task computed from sentence embeddings (bi-encoder
    regression): the first run records the texts it embeds and gets zeros, the second gets the graph's
    embeddings of those texts."""

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        self.calls: list[_Call] = []
        self.results: list[torch.Tensor] | None = None

    def embed(self, input_ids, attention_mask, token_type_ids=None):
        if self.results is None:
            self.calls.append(_Call([SENTENCE_EMBEDDING], input_ids, attention_mask, token_type_ids))
            return torch.zeros(len(input_ids), self.hidden_size)
        return self.results.pop(0)

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        raise MultituneError("this task reads token states, which the ONNX graph only gives to its own heads")


class OnnxMultiTaskModel:
    """An exported multi-task model on onnxruntime: ``predict``, ``predict_mixed`` and ``embed_texts`` as
    :class:`~multitune.model.MultiTaskModel` gives them (same decoding, same order). Build it with
    :meth:`load`.

    Args:
        session: the ``onnxruntime.InferenceSession`` of ``model.onnx``.
        tasks: task name -> task, restored from ``multitune.json`` (only the tasks in the graph).
        tokenizer: the exported tokenizer.
        meta: the content of ``onnx.json``.
        pooling: sentence pooling the graph computes (for information).
        normalize_embeddings: whether the graph L2-normalises ``sentence_embedding``.
        max_length: truncation length of the inputs.
        architecture: the backbone family's :class:`~multitune.backbones.architectures.BackboneArchitecture`.

    Attributes:
        excluded: task -> why it is not in the graph (text-to-text, masked-LM); predict those with PyTorch.
        adapters: always None (adapters are merged before export).
        inference_precision: ``fp32``, the graph's.
        device: where the returned tensors live (the CPU; the graph may run on CUDA).
    """

    adapters = None
    inference_precision = "fp32"
    training = False

    def __init__(self, session: Any, tasks: dict[str, Task], tokenizer: Any, meta: dict, pooling: str,
                 normalize_embeddings: bool, max_length: int, architecture: Any):
        self.session = session
        self.tasks = dict(tasks)
        self.tokenizer = tokenizer
        self.meta = meta
        self.pooling = pooling
        self.normalize_embeddings = normalize_embeddings
        self.max_length = max_length
        self.architecture = architecture
        self.hidden_size = int(meta["hidden_size"])
        self.device = torch.device("cpu")
        self.excluded: dict[str, str] = dict(meta.get("excluded") or {})
        self.input_names: list[str] = list(meta["inputs"])
        self._sequence_outputs = {name for name, axes in meta["outputs"].items()
                                  if len(axes) > 1 and axes[1] == "sequence"}
        # heads of tasks computed from embeddings have no parameters: rebuilt here, they are the trained ones
        self._heads = {name: task.build_head(self.hidden_size) for name, task in self.tasks.items()
                       if meta["tasks"][name]["computed"] == FROM_EMBEDDINGS}

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, precision: str = "fp32",
             providers: Sequence[str] | None = None) -> OnnxMultiTaskModel:
        """Load a directory written by :func:`~multitune.onnx.export.export_onnx`.

        Args:
            path: the directory.
            device: ``cpu``, ``cuda`` (needs onnxruntime-gpu) or None: CUDA when onnxruntime has it, else the CPU.
            precision: ``fp32`` only (the graph's precision; accepted for :func:`multitune.load`'s signature).
            providers: onnxruntime execution providers, in order of preference (overrides ``device``).

        Returns:
            The model.

        Raises:
            MultituneError: missing or malformed files, a task the installed multitune does not know, an
                unavailable device, another precision, or the onnx extra missing.
        """
        from transformers import AutoTokenizer  # imported only when used: 0.7 s

        ort = require("onnxruntime")
        path = Path(path)
        if not is_onnx_model_dir(path):
            missing = [n for n in (GRAPH_FILE, ONNX_META_FILE, MODEL_FILE) if not (path / n).is_file()]
            raise MultituneError(f"{path}: not an ONNX model directory (missing {', '.join(missing)})")
        if precision != "fp32":
            raise MultituneError(f"precision: an ONNX model runs in fp32, the precision of its graph; got "
                                 f"{precision!r}")
        meta = _read_json(path / ONNX_META_FILE)
        if meta.get("format") != ONNX_FORMAT:
            raise MultituneError(f"{path / ONNX_META_FILE}: format: expected {ONNX_FORMAT!r}, got "
                                 f"{meta.get('format')!r}")
        for key in ("inputs", "outputs", "tasks", "hidden_size"):
            if key not in meta:
                raise MultituneError(f"{path / ONNX_META_FILE}: {key}: required field is missing")
        model_meta = _read_json(path / MODEL_FILE)
        tasks = restore_tasks(model_meta, path / MODEL_FILE)
        for name in meta["tasks"]:
            if name not in tasks:
                raise MultituneError(f"{path / MODEL_FILE}: tasks.{name}: missing (onnx.json puts it in the graph)")
        for name, entry in meta["tasks"].items():
            if entry.get("computed") not in (IN_GRAPH, FROM_EMBEDDINGS):
                raise MultituneError(f"{path / ONNX_META_FILE}: tasks.{name}.computed: expected {IN_GRAPH!r} or "
                                     f"{FROM_EMBEDDINGS!r}, got {entry.get('computed')!r}")
        tasks = {name: tasks[name] for name in meta["tasks"]}
        try:
            check_tokenizer_files(path, "")
        except ConfigError as exc:
            raise MultituneError(str(exc)) from None
        tokenizer = AutoTokenizer.from_pretrained(path)
        family = model_meta.get("backbone_type", "encoder")
        if family != "encoder":
            raise MultituneError(f"{path / MODEL_FILE}: backbone_type: ONNX models have encoder backbones, "
                                 f"got {family!r}")
        architecture = architecture_for(None, tokenizer, family)
        try:
            for task in tasks.values():
                task.bind(architecture, tokenizer)
        except ConfigError as exc:
            raise MultituneError(f"{path / MODEL_FILE}: {exc}") from None
        session = ort.InferenceSession(str(path / GRAPH_FILE), providers=list(providers or _providers(ort, device)))
        have = {o.name for o in session.get_outputs()}
        absent = [n for n in meta["outputs"] if n not in have]
        if absent:
            raise MultituneError(f"{path / GRAPH_FILE}: has no output {absent[0]!r} (named in {ONNX_META_FILE})")
        return cls(session, tasks, tokenizer, meta, model_meta.get("pooling", "mean"),
                   bool(model_meta.get("normalize_embeddings", False)), int(model_meta.get("max_length", 128)),
                   architecture)

    # -- inference -------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One run of the graph.

        Args:
            feeds: input name -> int64 array [batch, sequence] (``token_type_ids`` default to zeros).
            outputs: the output names wanted (default: all).

        Returns:
            Output name -> array.
        """
        names = list(outputs) if outputs is not None else list(self.meta["outputs"])
        ids = feeds["input_ids"]
        full = {n: np.asarray(feeds[n], dtype=np.int64) if n in feeds else np.zeros_like(ids, dtype=np.int64)
                for n in self.input_names}
        return dict(zip(names, self.session.run(names, full)))

    def _run_calls(self, calls: list[_Call]) -> list[dict[str, torch.Tensor]]:
        """Run the distinct token rows of all ``calls`` through the graph at once; returns each call's outputs
        (token-level outputs cut to the call's own width)."""
        keys, widths = [], []
        for call in calls:
            lengths = call.attention_mask.sum(1).tolist()
            widths.append(call.input_ids.shape[1])
            for r, n in enumerate(lengths):
                types = None if call.token_type_ids is None else tuple(call.token_type_ids[r, :n].tolist())
                keys.append((tuple(call.input_ids[r, :n].tolist()), types))
        unique = list(dict.fromkeys(keys))
        position = {k: j for j, k in enumerate(unique)}
        pad_id = self.tokenizer.pad_token_id or 0
        feeds = {"input_ids": pad([list(k[0]) for k in unique], pad_id).numpy(),
                 "attention_mask": pad([[1] * len(k[0]) for k in unique], 0).numpy(),
                 "token_type_ids": pad([list(k[1]) if k[1] is not None else [0] * len(k[0]) for k in unique],
                                       0).numpy()}
        names = list(dict.fromkeys(n for call in calls for n in call.outputs))
        arrays = self.run(feeds, names)
        index = np.array([position[k] for k in keys])
        results, start = [], 0
        for call, width in zip(calls, widths):
            rows = index[start:start + len(call.input_ids)]
            start += len(call.input_ids)
            out = {}
            for name in call.outputs:
                value = arrays[name][rows]
                out[name] = torch.from_numpy(value[:, :width] if name in self._sequence_outputs else value)
            results.append(out)
        return results

    @torch.inference_mode()
    def _infer(self, batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, TaskOutput]:
        """Each task's :class:`TaskOutput` for its collated batch, from one graph run for all of them."""
        calls: list[_Call] = []
        owners: list[tuple[str, int]] = []  # (task, number of calls)
        passes: dict[str, _EmbeddingPass] = {}
        for name, batch in batches.items():
            entry = self.meta["tasks"][name]
            if entry["computed"] == IN_GRAPH:
                calls.append(_Call(list(entry["outputs"].values()), batch["input_ids"], batch["attention_mask"],
                                   batch.get("token_type_ids")))
                owners.append((name, 1))
            else:
                passes[name] = _EmbeddingPass(self.hidden_size)
                self.tasks[name].infer(passes[name], self._heads[name], batch)  # records the texts it embeds
                calls.extend(passes[name].calls)
                owners.append((name, len(passes[name].calls)))
        results = self._run_calls(calls) if calls else []
        out, start = {}, 0
        for name, n in owners:
            mine, start = results[start:start + n], start + n
            if name in passes:
                passes[name].results = [r[SENTENCE_EMBEDDING] for r in mine]
                out[name] = self.tasks[name].infer(passes[name], self._heads[name], batches[name])
            else:
                keys = self.meta["tasks"][name]["outputs"]
                out[name] = TaskOutput(None, {key: mine[0][graph_name] for key, graph_name in keys.items()})
        return out

    def _check_task(self, task: str) -> None:
        if task in self.tasks:
            return
        if task in self.excluded:
            raise MultituneError(f"task {task!r} is not in the ONNX graph ({self.excluded[task]}); predict it "
                                 f"with the PyTorch model")
        raise MultituneError(f"the model has no task {task!r}; its tasks: {', '.join(self.tasks)}")

    def predict(self, task: str, inputs: Sequence[Any], batch_size: int = 64) -> list[dict]:
        """Predict for raw inputs: strings, (text, text_pair) tuples or example dicts, as
        :meth:`MultiTaskModel.predict <multitune.model.MultiTaskModel.predict>` does.

        Args:
            task: a task in the graph.
            inputs: the inputs.
            batch_size: inputs per graph run (batches are formed in length order, less padding).

        Returns:
            One JSON-able dict per input, in input order.

        Raises:
            MultituneError: the model has no task ``task``, or it is not in the graph.
        """
        self._check_task(task)
        if not inputs:
            return []
        t = self.tasks[task]
        examples = prediction_examples(task, t, inputs)
        feats = t.encode(examples, self.tokenizer, self.max_length)
        order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
        pad_id = self.tokenizer.pad_token_id or 0
        out: list[Any] = [None] * len(examples)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = t.collate([feats[i] for i in idx], pad_id, torch.Generator().manual_seed(start))
            preds = t.decode(self._infer({task: batch})[task], batch, [examples[i] for i in idx])
            for i, p in zip(idx, preds):
                out[i] = p
        return out

    def predict_mixed(self, requests: Sequence[tuple[str, Any]]) -> list[dict]:
        """Predict one mixed-task batch of ``(task, input)`` pairs with one graph run (as
        :func:`multitune.tasks.mixed.predict_mixed` does on the PyTorch model).

        Returns:
            One JSON-able prediction per request, in order.

        Raises:
            MultituneError: a request names a task the model has not, or one not in the graph.
        """
        for task, _ in requests:
            self._check_task(task)
        if not requests:
            return []
        groups: dict[str, list[int]] = {}
        for i, (task, _) in enumerate(requests):
            groups.setdefault(task, []).append(i)
        pad_id = self.tokenizer.pad_token_id or 0
        prepared = {}
        for name, idx in groups.items():
            t = self.tasks[name]
            examples = [t.example_from_input(requests[i][1]) for i in idx]
            feats = t.encode(examples, self.tokenizer, self.max_length)
            prepared[name] = (examples, t.collate(feats, pad_id, torch.Generator().manual_seed(0)))
        outputs = self._infer({name: batch for name, (_, batch) in prepared.items()})
        out: list[Any] = [None] * len(requests)
        for name, (examples, batch) in prepared.items():
            for i, p in zip(groups[name], self.tasks[name].decode(outputs[name], batch, examples)):
                out[i] = p
        return out

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64, task: str | None = None) -> torch.Tensor:
        """Sentence embeddings of ``texts`` [n, hidden], pooled and normalised as the model was.

        Args:
            texts: the texts.
            batch_size: texts per graph run.
            task: accepted for the signature of :meth:`MultiTaskModel.embed_texts
                <multitune.model.MultiTaskModel.embed_texts>`; an exported model has no adapters to route.

        Returns:
            A float32 tensor [len(texts), hidden_size].
        """
        out = torch.zeros(len(texts), self.hidden_size)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="np")
            emb = self.run({k: v for k, v in enc.items() if k in self.input_names}, [SENTENCE_EMBEDDING])
            out[idx] = torch.from_numpy(emb[SENTENCE_EMBEDDING]).float()
        return out

    def eval(self) -> OnnxMultiTaskModel:
        """No-op (the graph has no training mode); returns the model."""
        return self

    def __repr__(self) -> str:
        return (f"OnnxMultiTaskModel(tasks={list(self.tasks)}, providers={self.session.get_providers()}, "
                f"excluded={list(self.excluded)})")


def _providers(ort: Any, device: str | torch.device | None) -> list[str]:
    """Execution providers for ``device``: CUDA first when asked for (or available with no device given)."""
    available = ort.get_available_providers()
    try:
        kind = None if device is None else torch.device(device).type
    except (RuntimeError, TypeError):
        raise MultituneError(f"device: expected cpu or cuda, got {device!r}") from None
    if kind == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise MultituneError(f"device: cuda needs onnxruntime with CUDAExecutionProvider (pip install "
                                 f"onnxruntime-gpu); available: {', '.join(available)}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if kind not in (None, "cpu"):
        raise MultituneError(f"device: expected cpu or cuda for an ONNX model, got {device}")
    if kind is None and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# multitune.load (and so the CLI and the server) reads an ONNX export as this model
MODEL_FORMATS.register("onnx")(ModelFormat(is_onnx_model_dir, OnnxMultiTaskModel.load))
