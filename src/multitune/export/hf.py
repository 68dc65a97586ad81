"""One task of a multi-task model as the transformers model its users' tools load.

The task says what it becomes (:meth:`multitune.tasks.Task.export_spec`): a head on token states exports
through the matching Auto class (``AutoModelForSequenceClassification``, ``...ForTokenClassification``,
``...ForMaskedLM``); a text-to-text task is the backbone itself with its generation settings; a bi-encoder is the
backbone with its pooling.

For a head, the stock class of the backbone's architecture is used when one of its known layouts computes the
task exactly: the head's weights are put in place and the stock model is run on probe inputs against the task;
only an exact match (max |logit difference| <= :data:`TOLERANCE`) is written. Otherwise the export carries
``modeling_multitune.py`` (registered through ``auto_map``), whose classes compute the head as trained (mean or
max pooling, heads on decoder-only backbones); it loads with ``trust_remote_code=True``, and transformers refuses
it without (its ``model_type`` is ``multitune``) instead of building a newly initialised head.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from multitune.errors import MultituneError
from multitune.export import modeling_multitune as mm
from multitune.tasks.base import ExportSpec

#: largest |logit difference| accepted between an exported model and the task, in fp32
TOLERANCE = 1e-4
AUTO_CLASSES = {"sequence_classification": "AutoModelForSequenceClassification",
                "token_classification": "AutoModelForTokenClassification", "masked_lm": "AutoModelForMaskedLM"}
# head module -> stock module, per task kind; "{base}" is the stock class's base_model_prefix. The first layout
# that reproduces the task's logits wins.
STOCK_LAYOUTS = {
    "sequence_classification": [{"dense": "{base}.pooler.dense", "classifier": "classifier"},       # BERT family
                                {"dense": "classifier.dense", "classifier": "classifier.out_proj"}],  # RoBERTa family
    "token_classification": [{"classifier": "classifier"}, {"classifier": "score"}],
    "masked_lm": [{"dense": "cls.predictions.transform.dense", "norm": "cls.predictions.transform.LayerNorm",
                   "bias": "cls.predictions.bias"},                                                 # BERT family
                  {"dense": "lm_head.dense", "norm": "lm_head.layer_norm", "bias": "lm_head.bias"}],   # RoBERTa family
}
# head module -> module of the shipped classes (modeling_multitune.py)
CUSTOM_LAYOUTS = [{"dense": "dense", "classifier": "classifier"}, {"classifier": "classifier"},
                  {"regressor": "classifier"}]
CUSTOM_CLASSES = {"sequence_classification": "MultituneForSequenceClassification",
                  "token_classification": "MultituneForTokenClassification"}
MODELING_FILE = "modeling_multitune.py"


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports while candidate models are built (their missing / unexpected keys
    are checked here)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def probe_batch(model: Any, task: str, spec: ExportSpec) -> dict[str, torch.Tensor]:
    """The task's probe inputs as one padded batch (varied lengths), on the model's device."""
    t = model.tasks[task]
    examples = [t.example_from_input(x) for x in spec.probes]
    feats = t.encode(examples, model.tokenizer, model.max_length)
    batch = t.collate(feats, model.tokenizer.pad_token_id or 0, torch.Generator().manual_seed(0))
    return {k: v.to(model.device) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The batch's ``input_ids``, ``attention_mask`` and (when the model takes them) ``token_type_ids``."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch and "token_type_ids" in inspect.signature(module.forward).parameters:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def _mapped(head_state: dict[str, torch.Tensor], layout: dict[str, str], base: str) -> dict[str, torch.Tensor] | None:
    """The head's tensors under the layout's names, or None when the layout does not fit the head."""
    modules = {key.split(".")[0] for key in head_state}
    if modules != set(layout):
        return None
    out = {}
    for key, value in head_state.items():
        module, _, rest = key.partition(".")
        target = layout[module].replace("{base}", base)
        out[f"{target}.{rest}" if rest else target] = value
    return out


def _max_difference(candidate: nn.Module, batch: dict, reference: torch.Tensor) -> float:
    candidate.eval()
    with torch.no_grad():
        logits = candidate(**model_inputs(batch, candidate)).logits.float()
    if logits.shape != reference.shape:
        return float("inf")
    return float((logits - reference).abs().max())


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], allowed_missing: tuple[str, ...] = ()) -> bool:
    """Load ``state`` into ``module``; True when no key of ``module`` stays unset (besides ``allowed_missing``
    prefixes and weights tied to loaded ones) and every key of ``state`` fits."""
    own = module.state_dict()
    if any(k not in own or own[k].shape != v.shape for k, v in state.items()):
        return False
    module.load_state_dict(state, strict=False)
    loaded = {id(p) for k, p in module.state_dict(keep_vars=True).items() if k in state}
    missing = [k for k, p in module.state_dict(keep_vars=True).items()
               if k not in state and id(p) not in loaded and not k.startswith(allowed_missing)]
    return not missing


def stock_model(model: Any, task: str, spec: ExportSpec, batch: dict, reference: torch.Tensor
                ) -> tuple[nn.Module, float] | None:
    """The stock transformers model that computes ``task`` exactly, with the task's weights, or None.

    Only an encoder backbone (loaded with ``AutoModel``) has stock task classes built on it.
    """
    if model.architecture.type_name != "encoder" or spec.kind not in STOCK_LAYOUTS:
        return None
    auto = getattr(transformers, AUTO_CLASSES[spec.kind])
    config = copy.deepcopy(model.backbone.config)
    for key, value in spec.config.items():
        setattr(config, key, value)
    config.architectures = None
    backbone_state = {k: v.detach().float() for k, v in model.backbone.state_dict().items()}
    head_state = {k: v.detach().float() for k, v in model.heads[task].state_dict().items()}
    for layout in STOCK_LAYOUTS[spec.kind]:
        try:
            with _quiet_transformers():
                candidate = auto.from_config(config)
        except ValueError:  # no such class for this architecture
            return None
        candidate.to(model.device)
        base = candidate.base_model_prefix
        mapped = _mapped(head_state, layout, base)
        if mapped is None or not hasattr(candidate, base):
            continue
        state = {f"{base}.{k}": v for k, v in backbone_state.items() if f"{base}.{k}" in candidate.state_dict()}
        # a pooler the stock class does not have is left out; the head's own pooler overrides the backbone's
        if not _load_strict(candidate, {**state, **mapped}):
            continue
        difference = _max_difference(candidate, batch, reference)
        if difference <= TOLERANCE:
            return candidate, difference
    return None


def custom_model(model: Any, task: str, spec: ExportSpec, batch: dict, reference: torch.Tensor
                 ) -> tuple[nn.Module, float, str]:
    """The model of ``modeling_multitune.py`` that computes ``task`` exactly, with the task's weights.

    Returns:
        ``(model, max difference, backbone key prefix in the backbone's own state dict)``.

    Raises:
        MultituneError: the task kind has no such class, or no backbone layout reproduces the task.
    """
    if spec.kind not in CUSTOM_CLASSES:
        raise MultituneError(f"task {task!r} ({spec.kind}) has no stock transformers class that computes it on a "
                             f"{model.backbone.config.model_type} backbone; deploy the run's model or export ONNX")
    token_model = model.architecture.token_model(model.backbone)
    head = model.heads[task]
    head_state = {k: v.detach().float() for k, v in head.state_dict().items()}
    full_state = {k: v.detach().float() for k, v in model.backbone.state_dict().items()}
    # the token model's weights under the names of AutoModel (encoder, decoder-only base) or of
    # AutoModelForTextEncoding (the encoder of T5-style models, named as in the full model)
    token_prefix = next((p for p in ("", f"{getattr(model.backbone, 'base_model_prefix', '')}.")
                         if p and all(f"{p}{k}" in full_state for k in token_model.state_dict())), "")
    candidates = [("AutoModel", token_model.config, {k: v.detach().float() for k, v in token_model.state_dict().items()}),
                  ("AutoModelForTextEncoding", model.backbone.config, full_state)]
    layout = next((m for m in (_mapped(head_state, lay, "") for lay in CUSTOM_LAYOUTS) if m is not None), None)
    if layout is None:
        raise MultituneError(f"task {task!r}: its head does not fit the exported model classes")
    for backbone_class, backbone_config, state in candidates:
        config = mm.MultituneConfig(
            backbone=backbone_config.to_dict(), backbone_class=backbone_class, hidden_size=model.hidden_size,
            pooling=model.pooling, head="pooler" if "dense.weight" in head_state else "pooled",
            normalize_embeddings=model.normalize_embeddings,
            classifier_dropout=float(getattr(model.tasks[task].config, "dropout", 0.1)), **spec.config)
        try:
            with _quiet_transformers():
                candidate = getattr(mm, CUSTOM_CLASSES[spec.kind])(config)
        except (ValueError, KeyError):
            continue
        candidate.to(model.device)
        backbone_state = {f"backbone.{k}": v for k, v in state.items()
                          if f"backbone.{k}" in candidate.state_dict()}
        if not _load_strict(candidate, {**backbone_state, **layout}):
            continue
        difference = _max_difference(candidate, batch, reference)
        if difference <= TOLERANCE:
            prefix = "" if backbone_class == "AutoModelForTextEncoding" else token_prefix
            return candidate, difference, prefix
    raise MultituneError(f"task {task!r}: no exported model class reproduces its outputs on a "
                         f"{model.backbone.config.model_type} backbone; deploy the run's model or export ONNX")


def write_task_model(model: Any, task: str, directory: Path) -> dict:
    """Write ``task`` of ``model`` into ``directory`` as a transformers model directory (weights, config with
    label maps, tokenizer), and return what was written.

    Returns:
        ``kind``, ``pipeline_tag``, ``auto_class``, ``model_class``, ``trust_remote_code`` (whether loading
        needs it), ``max_difference`` (checked on probe inputs), and ``export`` (how multitune reloads the
        backbone from the directory: stored in ``multitune.json``).

    Raises:
        MultituneError: the task has no export, or no model class reproduces it.
    """
    directory = Path(directory)
    t = model.tasks[task]
    spec = t.export_spec()
    if spec is None:
        raise MultituneError(f"task {task!r} ({t.config.type}) has no stock transformers form to export")
    model.eval()
    report: dict[str, Any] = {"kind": spec.kind, "pipeline_tag": spec.pipeline_tag, "trust_remote_code": False}
    if spec.kind in ("generation", "sentence_embedding"):
        backbone = model.backbone
        for key, value in spec.config.items():
            if key != "multitune_label_range" or value is not None:
                setattr(backbone.config, key, value)
        if spec.kind == "generation":
            _generation_settings(backbone, spec, model.architecture)
        backbone.save_pretrained(directory, safe_serialization=True)
        report.update(auto_class=model.architecture.auto_class, model_class=type(backbone).__name__,
                      export={"layout": "backbone"})
        return report
    batch = probe_batch(model, task, spec)
    with torch.no_grad():
        reference = spec.logits(model, model.heads[task], batch).float()
    found = stock_model(model, task, spec, batch, reference)
    if found is not None:
        exported, difference = found
        prefix = f"{exported.base_model_prefix}."
        report.update(auto_class=AUTO_CLASSES[spec.kind], model_class=type(exported).__name__,
                      export={"layout": "task_model", "weights_prefix": prefix, "backbone_prefix": ""})
    else:
        exported, difference, backbone_prefix = custom_model(model, task, spec, batch, reference)
        exported.config.auto_map = {
            "AutoConfig": "modeling_multitune.MultituneConfig", "AutoModel": "modeling_multitune.MultituneModel",
            AUTO_CLASSES[spec.kind]: f"modeling_multitune.{CUSTOM_CLASSES[spec.kind]}"}
        exported.config.architectures = [CUSTOM_CLASSES[spec.kind]]
        report.update(auto_class=AUTO_CLASSES[spec.kind], model_class=CUSTOM_CLASSES[spec.kind],
                      trust_remote_code=True,
                      export={"layout": "task_model", "weights_prefix": "backbone.",
                              "backbone_prefix": backbone_prefix})
    exported.config.architectures = [report["model_class"]]
    directory.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(directory, safe_serialization=True)
    if report["trust_remote_code"]:
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), directory / MODELING_FILE)
    report["max_difference"] = difference
    report["export"]["backbone_config"] = model.backbone.config.to_dict()
    return report


def _generation_settings(backbone: nn.Module, spec: ExportSpec, architecture: Any) -> None:
    """Put the task's decoding settings and the special ids multitune generates with in the generation config,
    so that a plain ``generate`` decodes as ``multitune predict``."""
    params = next(iter(spec.config["task_specific_params"].values()))
    gen = getattr(backbone, "generation_config", None)
    if gen is None:
        return
    for key in ("num_beams", "max_new_tokens", "no_repeat_ngram_size", "length_penalty"):
        setattr(gen, key, params[key])
    gen.do_sample = False
    gen.pad_token_id = architecture.pad_id
    gen.eos_token_id = architecture.end_id
    start = getattr(architecture, "start_id", None)
    if start is not None:
        gen.decoder_start_token_id = start
