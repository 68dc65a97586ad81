"""One task's adapter and head in PEFT's own layout, for the stock client: a directory that
``peft.AutoPeftModelFor<Class>.from_pretrained(directory, **load_kwargs)`` loads by itself, building the stock
transformers class of the task (``BertForTokenClassification``, ``T5ForConditionalGeneration``...) on the base
model named in ``adapter_config.json`` and putting the adapter and the head (``modules_to_save``) into it.

A task has such a form when a stock class computes exactly what multitune computes:

- token classification: dropout then a linear layer over the token states is the stock ``classifier`` (or
  ``score``) of ``AutoModelForTokenClassification``;
- classification and cross-encoder regression with ``head: pooler``: ``classifier(dropout(tanh(dense(h[:, 0]))))``
  is the stock ``AutoModelForSequenceClassification`` of BERT-style encoders (``dense`` becomes the base model's
  ``pooler.dense``) and of RoBERTa-style ones (``classifier.dense`` and ``classifier.out_proj``);
- text-to-text: the backbone itself is the stock ``AutoModelForSeq2SeqLM`` / ``AutoModelForCausalLM``.

Adapter keys are laid out for the stock class: an encoder backbone's module ``encoder.layer.0...`` is
``{base_model_prefix}.encoder.layer.0...`` there (``bert.encoder...``), found from the stock class's own module
tree, never from a family name. What the stock client cannot do by itself is written down in :func:`usage`:
the label maps it must be given (PEFT builds the base class from the base model's config alone, and PEFT
cannot resize a saved head), how inputs are tokenised and how logits become multitune's predictions.

:func:`verify` loads the written directory with the stock client and compares it with the multitune model on
probe inputs, so that an export that would predict differently is never published.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from multitune.backbones.checks import PROBE_TEXTS
from multitune.errors import MultituneError

# PEFT task type -> (transformers auto class, the PEFT auto class that loads it)
STOCK_CLASSES = {
    "TOKEN_CLS": ("AutoModelForTokenClassification", "AutoPeftModelForTokenClassification"),
    "SEQ_CLS": ("AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification"),
    "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM"),
    "CAUSAL_LM": ("AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
}
# what a task exports as (ExportSpec.kind) -> PEFT task type; generation: per backbone family
TASK_TYPES: dict[str, str | dict[str, str]] = {
    "token_classification": "TOKEN_CLS",
    "sequence_classification": "SEQ_CLS",
    "generation": {"encoder_decoder": "SEQ_2_SEQ_LM", "decoder_only": "CAUSAL_LM"},
}
# entries of an ExportSpec's config that the stock class's config takes from ``from_pretrained`` keywords
LABEL_KEYS = ("num_labels", "id2label", "label2id", "problem_type")
POOLER_HEAD = {"dense.weight", "dense.bias", "classifier.weight", "classifier.bias"}
LINEAR_HEAD = {"classifier.weight", "classifier.bias"}
# what verify accepts: float32 round-off between two implementations of the same computation
ATOL = 1e-5
RTOL = 1e-5


@dataclass
class PeftPlan:
    """How one task maps onto a stock class.

    Attributes:
        task_type: PEFT task type (``TOKEN_CLS``, ``SEQ_CLS``, ``SEQ_2_SEQ_LM``, ``CAUSAL_LM``).
        auto_model: the transformers auto class that builds the stock class.
        auto_peft: the PEFT auto class that loads the export.
        sites: stock module path -> the task's adapter on that module (all of it for prompt methods).
        head: head state-dict key -> stock parameter path.
        modules_to_save: stock modules PEFT replaces with the saved head.
        load_kwargs: what ``from_pretrained`` must be given besides the directory (label maps).
    """

    task_type: str
    auto_model: str
    auto_peft: str
    sites: dict[str, nn.Module]
    head: dict[str, str] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    load_kwargs: dict[str, Any] = field(default_factory=dict)


def _refuse(task: str, why: str, model: Any) -> MultituneError:
    instead = ("export it with --merge, which is exact" if model.adapters.method.mergeable
               else "deploy the run's model directory (multitune.load)")
    return MultituneError(f"task {task!r} has no exact PEFT export: {why}; {instead}")


def _path_of(root: nn.Module, module: nn.Module) -> str:
    for path, m in root.named_modules():
        if m is module:
            return path
    raise MultituneError("the token model is not part of the backbone")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _skeleton(model: Any, auto_model: str, load_kwargs: dict) -> nn.Module:
    """The stock class on the meta device (module tree and shapes, no memory)."""
    import transformers  # imported only when used: 0.5 s

    config = copy.deepcopy(model.backbone.config)
    for key in LABEL_KEYS:
        if key in load_kwargs:
            setattr(config, key, load_kwargs[key])
    auto = getattr(transformers, auto_model)
    try:
        with torch.device("meta"), _quiet():
            return auto.from_config(config)
    except (ValueError, KeyError) as exc:
        raise MultituneError(f"transformers has no {auto_model} for {type(config).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}") from None


def plan(model: Any, task: str) -> PeftPlan:
    """Map ``task`` of ``model`` onto its stock transformers class.

    Args:
        model: a :class:`~multitune.model.MultiTaskModel` with adapters.
        task: one of its tasks.

    Returns:
        The :class:`PeftPlan`.

    Raises:
        MultituneError: the task, its head or the adapter method has no exact stock equivalent (one line,
            with why and what to do instead).
    """
    adapters, t = model.adapters, model.tasks[task]
    method = adapters.method
    if method.peft_type is None or adapters.task_embeddings is not None:
        raise _refuse(task, f"{adapters.config.method} ({adapters.config.arrangement}) adapters have no PEFT "
                            f"equivalent", model)
    if method.peft_inexact:
        raise _refuse(task, method.peft_inexact, model)
    spec = t.export_spec()
    kind = TASK_TYPES.get(spec.kind) if spec is not None else None
    if isinstance(kind, dict):
        kind = kind.get(model.architecture.type_name)
    if kind is None:
        what = spec.kind.replace("_", " ") if spec is not None else t.config.type
        raise _refuse(task, f"PEFT has no auto class for {what} tasks on {model.architecture.type_name} "
                            f"backbones", model)
    auto_model, auto_peft = STOCK_CLASSES[kind]
    load_kwargs = {k: spec.config[k] for k in LABEL_KEYS if spec.config.get(k) is not None}
    if "id2label" in load_kwargs:  # the label map sets the number of labels; both would be redundant
        load_kwargs.pop("num_labels", None)
    stock = _skeleton(model, auto_model, load_kwargs)
    stock_modules = dict(stock.named_modules())
    if kind in ("SEQ_2_SEQ_LM", "CAUSAL_LM"):
        if type(stock) is not type(model.backbone):
            raise _refuse(task, f"{auto_model} builds a {type(stock).__name__}, not the run's "
                                f"{type(model.backbone).__name__}", model)
        base, token_path, head, keep = "", "", {}, []
    else:
        token_model = model.architecture.token_model(model.backbone)
        token_path = _path_of(model.backbone, token_model)
        base = next((p for p, m in stock_modules.items() if type(m) is type(token_model)), None)
        if base is None:
            raise _refuse(task, f"{type(stock).__name__} has no {type(token_model).__name__} inside", model)
        head, keep = _head_map(model, task, kind, stock, stock_modules, base)
    sites = {}
    for path, adapter in adapters.modules_by_site(task).items():
        if method.peft_prompt_learning:  # one adapter for the whole model, no module path
            sites[path] = adapter
            continue
        if token_path and not path.startswith(token_path + "."):
            continue  # e.g. the decoder of an encoder-decoder, which a head task never runs
        mapped = _join(base, path[len(token_path) + 1:] if token_path else path)
        if mapped not in stock_modules or any(mapped == k or mapped.startswith(k + ".") for k in keep):
            continue  # e.g. the base model's pooler, which multitune's heads never read
        sites[mapped] = adapter
    if not sites:
        raise _refuse(task, "none of the adapted layers is part of the stock class", model)
    return PeftPlan(kind, auto_model, auto_peft, sites, head, keep, load_kwargs)


def _head_map(model: Any, task: str, kind: str, stock: nn.Module, modules: dict[str, nn.Module], base: str
              ) -> tuple[dict[str, str], list[str]]:
    """Which stock parameters hold the head, and the stock modules PEFT saves (``modules_to_save``)."""
    keys = set(model.heads[task].state_dict())

    def linear(path: str) -> bool:
        return isinstance(modules.get(path), nn.Linear)

    if kind == "TOKEN_CLS":
        if keys != LINEAR_HEAD:
            raise _refuse(task, f"its head ({', '.join(sorted(keys))}) is not dropout + one linear layer", model)
        tops = [n for n, m in stock.named_children() if isinstance(m, nn.Linear)]
        if len(tops) != 1:
            raise _refuse(task, f"{type(stock).__name__} has no single linear classifier", model)
        return {"classifier.weight": f"{tops[0]}.weight", "classifier.bias": f"{tops[0]}.bias"}, tops
    if keys == POOLER_HEAD:
        if linear(f"{base}.pooler.dense") and linear("classifier"):  # BERT: the base model's pooler
            return ({"dense.weight": f"{base}.pooler.dense.weight", "dense.bias": f"{base}.pooler.dense.bias",
                     "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"},
                    ["classifier", f"{base}.pooler"])
        if linear("classifier.dense") and linear("classifier.out_proj"):  # RoBERTa: a classification head
            return ({"dense.weight": "classifier.dense.weight", "dense.bias": "classifier.dense.bias",
                     "classifier.weight": "classifier.out_proj.weight", "classifier.bias": "classifier.out_proj.bias"},
                    ["classifier"])
        raise _refuse(task, f"{type(stock).__name__} has no pooler + classifier to hold the head", model)
    raise _refuse(task, f"its head ({model.pooling} pooling -> dropout -> linear) is computed by no stock "
                        f"transformers class (train it with head: pooler for a PEFT export)", model)


def write(model: Any, task: str, p: PeftPlan, directory: Path, base_model: str) -> int:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter + head) into ``directory``.

    Args:
        model: the multitune model.
        task: the task.
        p: its :func:`plan`.
        directory: an existing directory.
        base_model: ``base_model_name_or_path`` (a hub id or a local model directory).

    Returns:
        The bytes of ``adapter_model.safetensors``.

    Raises:
        MultituneError: a head tensor does not fit the stock parameter it maps to.
    """
    config, state = model.adapters.method.peft_export(model.backbone, p.sites)
    config.task_type = p.task_type
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    config.modules_to_save = list(p.modules_to_save) or None
    skeleton = dict(_skeleton(model, p.auto_model, p.load_kwargs).named_parameters())
    # PEFT wraps the stock model in a tuner model (``base_model.model.``) except for prompt methods
    root = "base_model." if model.adapters.method.peft_prompt_learning else "base_model.model."
    for key, value in model.heads[task].state_dict().items():
        target = skeleton.get(p.head.get(key, ""))
        if target is None:
            raise MultituneError(f"task {task!r}: the stock class has no parameter for head tensor {key}")
        if tuple(target.shape) != tuple(value.shape):
            raise MultituneError(f"task {task!r}: head tensor {key} {tuple(value.shape)} does not fit "
                                 f"{p.head[key]} {tuple(target.shape)} of the stock class")
        state[root + p.head[key]] = value
    config.save_pretrained(str(directory))
    weights = directory / "adapter_model.safetensors"
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    return weights.stat().st_size


def usage(model: Any, task: str, p: PeftPlan) -> dict:
    """What a user of the stock client needs besides the directory.

    Returns:
        ``auto_class`` and ``task_type``; ``load_kwargs`` for ``from_pretrained``; ``inputs``: how multitune
        tokenises (``prompt_ids_before`` / ``prompt_ids_after`` around a decoder-only prompt); ``outputs``: how
        the stock outputs become multitune's predictions; for text-to-text ``generate_kwargs``.
    """
    t = model.tasks[task]
    spec = t.export_spec()
    arch, n = model.architecture, model.max_length
    out: dict[str, Any] = {"auto_class": p.auto_peft, "task_type": p.task_type, "load_kwargs": p.load_kwargs}
    if p.task_type == "TOKEN_CLS":
        out["inputs"] = (f"tokenizer(words, is_split_into_words=True, truncation=True, max_length={n}), words "
                         f"as multitune splits text: runs of word characters and single punctuation marks")
        out["outputs"] = ("a word's tag is id2label[argmax] of its first sub-token's logits; words cut off by "
                          "truncation are O")
    elif p.task_type == "SEQ_CLS":
        out["inputs"] = f"tokenizer(text[, text_pair], truncation=True, max_length={n})"
        problem = spec.config.get("problem_type")
        thresholds = spec.config.get("multitune_thresholds")
        if problem == "regression":
            rng = spec.config.get("multitune_label_range")
            out["outputs"] = (f"score = {rng[0]} + ({rng[1]} - {rng[0]}) * sigmoid(logits[:, 0])" if rng
                              else "score = logits[:, 0]")
        elif problem == "multi_label_classification":
            cut = thresholds or {lab: getattr(t.config, "threshold", 0.5) for lab in spec.config["label2id"]}
            out["outputs"] = f"the labels whose sigmoid(logit), rounded to 6 digits, reaches its threshold: {cut}"
        elif thresholds:
            (label, cut), = thresholds.items()
            other = next(lab for lab in spec.config["label2id"] if lab != label)
            out["outputs"] = (f"{label!r} when softmax(logits)[:, 1], rounded to 6 digits, is >= {cut}, "
                              f"else {other!r}")
        else:
            out["outputs"] = "label = id2label[argmax(logits)]"
    else:
        params = spec.config["task_specific_params"][task]
        kwargs: dict[str, Any] = {k: params[k] for k in ("num_beams", "max_new_tokens", "length_penalty",
                                                           "no_repeat_ngram_size")}
        kwargs.update(do_sample=False, eos_token_id=arch.end_id, pad_token_id=arch.pad_id)
        prefix = params["prefix"]
        if p.task_type == "SEQ_2_SEQ_LM":
            kwargs["decoder_start_token_id"] = arch.start_id
            out["inputs"] = f"tokenizer(prefix + source, truncation=True, max_length={n}), prefix {prefix!r}"
            out["outputs"] = "the generated ids after the decoder start token, decoded with skip_special_tokens=True"
        else:
            before, after = _prompt_template(model, task)
            out["prompt_ids_before"], out["prompt_ids_after"] = before, after
            out["inputs"] = (f"prompt_ids_before + tokenizer(prefix + source, add_special_tokens=False, "
                             f"truncation=True, max_length={n}).input_ids + prompt_ids_after, prefix {prefix!r}; "
                             f"a batch of prompts is padded on the left")
            out["outputs"] = "the generated ids after the prompt, decoded with skip_special_tokens=True"
        out["generate_kwargs"] = kwargs
    return out


def _prompt_template(model: Any, task: str) -> tuple[list[int], list[int]]:
    """The token ids a decoder-only prompt has around its text: read off the task's own encoding of a one-token
    source, so that they are exactly multitune's (chat template or not)."""
    t = model.tasks[task]
    tok = model.tokenizer
    source = next(w for w in ("x", "a", "0") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    prefix = t.config.prefix
    text = tok(prefix + source, add_special_tokens=False)["input_ids"]
    ids = t.encode([{"source": source}], tok, model.max_length)[0]["input_ids"]
    for i in range(len(ids) - len(text) + 1):
        if ids[i:i + len(text)] == text:
            return ids[:i], ids[i + len(text):]
    raise MultituneError(f"task {task!r}: cannot find the source inside its prompt")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers load reports or progress bars (a stock class built on a base model always reports
    its fresh head as newly initialised, before PEFT replaces it)."""
    from transformers.utils import logging  # imported only when used: 0.5 s

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load(directory: Path, p: PeftPlan) -> Any:
    """Load an export the way a user does: ``peft.<auto class>.from_pretrained(directory, **load_kwargs)``.

    Raises:
        MultituneError: the stock client cannot load it (e.g. the base model is not reachable offline).
    """
    import peft  # imported only when used: 2 s

    auto = getattr(peft, p.auto_peft)
    try:
        with _quiet():
            return auto.from_pretrained(str(directory), **p.load_kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the stock client fails with, the export is unusable
        raise MultituneError(f"peft.{p.auto_peft} cannot load the export: "
                             f"{' '.join(str(exc).split())[:300]}") from None


@torch.no_grad()
def verify(model: Any, task: str, p: PeftPlan, directory: Path) -> dict:
    """Load ``directory`` with the stock PEFT client, as a user does, and compare it with ``model`` on probe
    inputs: the logits (head tasks: those multitune's predictions are made from; text-to-text: of the first
    generated token) and, for text-to-text, the generated tokens.

    Args:
        model: the multitune model whose task ``task`` was written.
        task: the task.
        p: its :func:`plan`.
        directory: the written export.

    Returns:
        ``{"probes": number of probe inputs, "max_difference": largest |logit difference| seen}``.

    Raises:
        MultituneError: the stock client cannot load the export or predicts differently.
    """
    t = model.tasks[task]
    spec = t.export_spec()
    stock = load(directory, p)
    was_training = model.training
    model.eval()
    try:
        device = model.device
        stock.to(device)
        probes = spec.probes or list(PROBE_TEXTS)
        feats = t.encode([t.example_from_input(x) for x in probes], model.tokenizer, model.max_length)
        batch = t.collate(feats, model.tokenizer.pad_token_id or 0, torch.Generator().manual_seed(0))
        batch = {k: v.to(device) for k, v in batch.items()}
        generated = None
        if spec.logits is not None:
            with model.route(task):
                ours = spec.logits(model, model.heads[task], batch).float()
        try:
            if spec.logits is not None:
                kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
                theirs = stock(**kwargs).logits.float()
            else:
                ours, theirs, generated = _compare_generation(model, task, p, stock, batch)
        except Exception as exc:  # noqa: BLE001 - whatever the stock client fails with, the export is unusable
            raise MultituneError(f"task {task!r}: peft.{p.auto_peft} cannot run the export: "
                                 f"{' '.join(str(exc).split())[:300]}; nothing was written") from None
        if generated is not None:
            raise MultituneError(f"task {task!r}: the PEFT export generates other tokens than multitune "
                                 f"({generated}); nothing was written")
        if ours.shape != theirs.shape:
            raise MultituneError(f"task {task!r}: the PEFT export's logits have shape {tuple(theirs.shape)}, "
                                 f"multitune's {tuple(ours.shape)}; nothing was written")
        diff = (ours - theirs).abs()
        worst = float(diff.max()) if diff.numel() else 0.0
        if not torch.all(diff <= ATOL + RTOL * ours.abs()):
            raise MultituneError(f"task {task!r}: the PEFT export predicts differently from multitune (max "
                                 f"|logit difference| {worst:.2e} on probe inputs); nothing was written")
        return {"probes": len(probes), "max_difference": worst}
    finally:
        model.train(was_training)
        del stock


def _compare_generation(model: Any, task: str, p: PeftPlan, stock: Any, batch: dict
                        ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Logits of the first generated token from multitune and from the stock client, and None when both
    generate the same tokens (else a short description of the difference)."""
    settings = usage(model, task, p)["generate_kwargs"]
    if p.task_type == "SEQ_2_SEQ_LM":
        ids, mask = batch["input_ids"], batch["attention_mask"]
        start = torch.full((ids.shape[0], 1), settings["decoder_start_token_id"], device=ids.device)
        forward = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": start}
        theirs_ids = stock.generate(input_ids=ids, attention_mask=mask, **settings)[:, 1:]
    else:
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        forward = {"input_ids": ids, "attention_mask": mask}
        theirs_ids = stock.generate(input_ids=ids, attention_mask=mask, **settings)[:, ids.shape[1]:]
    theirs = stock(**forward, use_cache=False).logits[:, -1].float()
    with model.route(task):
        ours = model.backbone(**forward, use_cache=False).logits[:, -1].float()
    generate = getattr(model.tasks[task], "generate", None)  # generation even when the task scores its labels
    with model.route(task):
        ours_ids = generate(model, batch) if generate else model.infer(task, batch).outputs["generated"]
    same = ours_ids.shape == theirs_ids.shape and torch.equal(ours_ids.cpu(), theirs_ids.cpu())
    return ours, theirs, None if same else f"{ours_ids.tolist()[:2]} vs {theirs_ids.tolist()[:2]}"
