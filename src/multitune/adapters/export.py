"""Adapter exports: one task's adapter and head for the client that runs them exactly (PEFT's
``AutoPeftModelFor<Class>``), or multitune's own layout where PEFT cannot reproduce the method. Called by
``multitune export`` (:mod:`multitune.export.task`) for an adapter model exported without ``--merge``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from multitune.adapters import peft_layout
from multitune.backbones.loading import DEFAULT_BACKBONE, resolve_backbone
from multitune.config.parse import to_dict
from multitune.errors import ConfigError, MultituneError
from multitune.fileio import write_json_atomic


def base_model_path(meta: dict) -> str:
    """What ``from_pretrained`` takes for the backbone a run started from: the hub id, or the local model
    directory (absolute; the packaged ``default`` backbone's installed directory). PEFT exports name it as
    ``base_model_name_or_path``.

    Args:
        meta: the run's ``multitune.json`` (its ``backbone_source`` is the config's ``backbone`` section).

    Returns:
        A hub id or an absolute directory path.

    Raises:
        MultituneError: no ``backbone_source`` is recorded, the backbone was warm-started from two checkpoints
            (no single base model), or a packaged backbone is not installed.
    """
    source = meta.get("backbone_source") if isinstance(meta, dict) else None
    if isinstance(source, str):
        source = {"name": source}
    if not isinstance(source, dict):
        raise MultituneError("multitune.json: no backbone_source (the backbone the run started from); expected "
                             "the run's model directory")
    if source.get("encoder") is not None or source.get("decoder") is not None:
        raise MultituneError("the backbone is an encoder-decoder warm-started from two checkpoints, which no "
                             "single base model id loads; export with --merge")
    name = source.get("name") or DEFAULT_BACKBONE
    try:
        resolved = resolve_backbone(name, "multitune.json: backbone_source.name")
    except ConfigError as exc:
        raise MultituneError(str(exc)) from None
    path = Path(resolved)
    return str(path.resolve()) if path.exists() else resolved


def export_adapter(model: Any, task: str, directory: Path, origin: dict, backbone_source: str) -> dict:
    """Write ``task``'s adapter and head to ``directory`` for the client that can run them exactly.

    PEFT's layout (LoRA, DoRA, IA3 on a task that a stock transformers class computes): the adapter
    and the head (``modules_to_save``) in ``adapter_config.json`` + ``adapter_model.safetensors``, with
    ``base_model_name_or_path`` and ``task_type`` set, the tokenizer, ``task.json`` and a ``README.md`` that
    says how to load it. ``peft.AutoPeftModelFor<Class>.from_pretrained(directory, **load_kwargs)`` loads it;
    ``load_kwargs`` (in the report and ``task.json``) are the label maps, which PEFT takes from no file of
    the adapter, and are empty for text-to-text. Before returning, the directory is loaded with that call and
    compared with ``model`` on probe inputs; an export that predicts differently raises.

    Multitune's own layout (bottleneck, prompt- and prefix-tuning adapters, the task embedding of
    ``shared_conditioned``, which PEFT cannot reproduce here): ``adapter.safetensors`` (keyed by backbone module path), multitune's
    ``adapter_config.json``, ``head.safetensors`` and ``task.json``; the report's ``note`` says so.

    Args:
        model: the loaded :class:`~multitune.model.MultiTaskModel`, adapters unmerged, the task's weights in
            place.
        task: the task to export.
        directory: an empty (or missing) directory; callers write into a temporary directory and rename it
            into place (as :func:`export_task` does).
        origin: where the weights come from (``source``, ``step``, maybe ``note``), recorded in ``task.json``.
        backbone_source: ``base_model_name_or_path``: a hub id or a local model directory
            (:func:`base_model_path`).

    Returns:
        ``layout`` (``peft`` or ``multitune``), ``client`` (what loads it, one line), ``bytes`` (of the weight
        files), ``note`` (own layout, or the origin's note); for PEFT's layout also ``auto_class``,
        ``task_type``, ``base_model_name_or_path``, ``load_kwargs``, ``inputs``, ``outputs``,
        ``generate_kwargs`` (text-to-text), ``probes`` and ``max_difference`` (of the check).

    Raises:
        MultituneError: the model has no adapters or no such task, the task is an AdapterFusion target,
            ``directory`` is not empty, the task or its head has no exact stock form (one line that says why
            and what to do instead), or the written export does not reproduce the model.
    """
    directory = Path(directory)
    adapters = model.adapters
    if adapters is None:
        raise MultituneError(f"task {task!r}: the model has no adapters; export the task as a model instead")
    if task not in model.tasks:
        raise MultituneError(f"the model has no task {task!r}; its tasks: {', '.join(model.tasks)}")
    if task in adapters.fusion_targets:
        raise MultituneError(f"task {task!r} uses AdapterFusion over every task's adapter; it has no "
                             f"single-adapter export, deploy the run's model directory")
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise MultituneError(f"{directory}: expected an empty directory to write the export into")
    model.eval()
    method = adapters.method
    if method.peft_type is None or method.peft_inexact or adapters.task_embeddings is not None:
        return _export_own_layout(model, task, directory, origin)
    plan = peft_layout.plan(model, task)
    base = Path(backbone_source)
    if base.is_dir() and not (base / "config.json").is_file():
        ggufs = sorted(f.name for f in base.glob("*.gguf"))
        if len(ggufs) != 1:
            raise MultituneError(f"{base}: expected config.json or one GGUF file for the base model")
        plan.load_kwargs["gguf_file"] = ggufs[0]  # transformers loads (dequantises) a GGUF backbone by name
    size = peft_layout.write(model, task, plan, directory, backbone_source)
    model.tokenizer.save_pretrained(directory)
    info = peft_layout.usage(model, task, plan)
    _write_task_json(model, task, directory, origin, {"layout": "peft", "base_model_name_or_path": backbone_source,
                                                      **info})
    check = peft_layout.verify(model, task, plan, directory)
    extra = "" if not info["load_kwargs"] else ", **load_kwargs"
    client = f"peft.{plan.auto_peft}.from_pretrained(directory{extra})"
    if "id2label" in info["load_kwargs"]:
        client += " with load_kwargs from task.json (id2label keys as int)"
    if "generate_kwargs" in info:
        client += ", then .generate(**inputs, **generate_kwargs)"
    report = {"layout": "peft", "client": client, "base_model_name_or_path": backbone_source, **info, **check,
              "bytes": size, "auto_peft": plan.auto_peft,
              "pipeline_tag": model.tasks[task].export_spec().pipeline_tag}
    if origin.get("note"):
        report["note"] = origin["note"]
    return report


def _export_own_layout(model: Any, task: str, directory: Path, origin: dict) -> dict:
    """Multitune's own layout, for adapters that PEFT cannot reproduce (see :func:`export_adapter`)."""
    adapters = model.adapters
    method = adapters.method
    state = {f"{p}.{k}": v.detach().cpu().contiguous()
             for p, ad in adapters.modules_by_site(task).items() for k, v in ad.state_dict().items()}
    if adapters.task_embeddings is not None:
        row = adapters.task_names.index(task)
        state["task_embedding"] = adapters.task_embeddings[row].detach().cpu().contiguous()
    save_file(state, str(directory / "adapter.safetensors"), metadata={"format": "multitune-adapter"})
    write_json_atomic(directory / "adapter_config.json", {**to_dict(adapters.config), "sites": list(state)})
    head = {k: v.detach().cpu().contiguous() for k, v in model.heads[task].state_dict().items()}
    save_file(head, str(directory / "head.safetensors"), metadata={"format": "multitune-head"})
    if method.peft_type is None:
        why = f"{adapters.config.method} adapters have no PEFT equivalent"
    elif method.peft_inexact:
        why = method.peft_inexact
    else:
        why = "the shared adapter's task embedding is part of no PEFT method"
    note = (f"{why}: written in multitune's own layout (adapter.safetensors keyed by backbone module, "
            f"head.safetensors, task.json), which no stock client loads; deploy the run's model directory "
            f"with multitune.load")
    _write_task_json(model, task, directory, origin, {"layout": "multitune", "note": note})
    size = sum((directory / f).stat().st_size for f in ("adapter.safetensors", "head.safetensors"))
    return {"layout": "multitune", "client": "multitune (the run's model directory); no stock client",
            "note": "; ".join(n for n in (origin.get("note"), note) if n), "bytes": size}


def _write_task_json(model: Any, task: str, directory: Path, origin: dict, export: dict) -> None:
    """``task.json``: the task's labels and settings, for multitune, and how the export loads."""
    cfg = to_dict(model.tasks[task].config)
    cfg.pop("data", None)
    write_json_atomic(directory / "task.json", {
        "name": task, "config": cfg, "state": model.tasks[task].state(), "pooling": model.pooling,
        "max_length": model.max_length, "adapters": to_dict(model.adapters.config), "source": origin["source"],
        "step": origin["step"], "export": export})


def peft_usage(path: str, report: dict) -> tuple[str, list[str]]:
    """The code that loads a PEFT export at ``path`` and runs it, and notes for its model card.

    Args:
        path: the export directory.
        report: what :func:`export_adapter` returned for it.

    Returns:
        ``(python code, notes)``.
    """
    code = ["import json", "", "import peft", "from transformers import AutoTokenizer", "",
            f"path = {path!r}", 'task = json.load(open(f"{path}/task.json"))',
            "tokenizer = AutoTokenizer.from_pretrained(path)"]
    if report["load_kwargs"]:
        code += ['kwargs = task["export"]["load_kwargs"]',
                 'if "id2label" in kwargs:  # JSON keys are strings; transformers looks labels up by int',
                 '    kwargs["id2label"] = {int(i): label for i, label in kwargs["id2label"].items()}',
                 f"model = peft.{report['auto_peft']}.from_pretrained(path, **kwargs)"]
    else:
        code.append(f"model = peft.{report['auto_peft']}.from_pretrained(path)")
    code.append("print(type(model.base_model.model).__name__)")
    notes = [f"Inputs: {report['inputs']}.", f"Outputs: {report['outputs']}."]
    if report["load_kwargs"]:
        notes.append("`load_kwargs` (in `task.json`) are the label maps: PEFT builds the base model's task class "
                     "from the base model's own config, which does not know this task's labels.")
    if "generate_kwargs" in report:
        notes.append("Generate with `model.generate(**inputs, **task['export']['generate_kwargs'])`: the task's "
                     "decoding settings and the special ids multitune generates with.")
    return "\n".join(code) + "\n", notes
