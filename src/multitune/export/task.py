"""``multitune export RUN --task T``: one task of a trained model as a directory its users' tools load.

Which weights: by default the task's own best validation step (``source="per-task-best"``) when the run kept a
snapshot of it (``training.per_task_best``), else the run's model; ``source="final"`` takes the run's model.

What is written (``format="hf"``, the default):

- a model without adapters, or with its LoRA / DoRA / IA3 adapter merged (``merge=True``): the task as a
  transformers model (:func:`multitune.export.hf.write_task_model`): ``config.json`` with the label maps,
  ``model.safetensors``, the tokenizer, for encoders the sentence-transformers layout, and a model card. It is
  also a one-task multitune model (``multitune.json``, ``heads.safetensors``, ``config.yaml`` for
  ``multitune evaluate``).
- an adapter model without ``merge``: the task's adapter for PEFT (:func:`multitune.adapters.export.export_adapter`).

``format="onnx"`` writes one ONNX graph (see docs/onnx.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from multitune.errors import MultituneError
from multitune.fileio import replace_dir, write_json_atomic

FORMATS = ("hf", "onnx")


def export_task(run: str | Path, task: str | None, output: str | Path, merge: bool = False, overwrite: bool = False,
                source: str = "per-task-best", fmt: str = "hf") -> dict:
    """Write ``task`` of the model in ``run`` to ``output`` (see the module docstring).

    Args:
        run: a run directory (or a model directory, which has no per-task snapshots).
        task: the task to export (``format="onnx"``: None exports every head task in one graph).
        output: the directory to write.
        merge: fold the task's adapter into the backbone (LoRA, DoRA, IA3).
        overwrite: replace a non-empty ``output``.
        source: ``per-task-best`` or ``final``.
        fmt: ``hf`` or ``onnx``.

    Returns:
        A report: ``output``, ``task``, ``format``, ``merged``, ``source``, ``step``, ``files``, ``bytes``, what
        loads it (``auto_class``, ``model_class``, ``trust_remote_code``, ``pipeline_tag``) and the largest
        logit difference measured against the task on probe inputs (``max_difference``).

    Raises:
        MultituneError: no such task, an option that does not apply to the model, a task with no export, or a
            non-empty ``output`` without ``overwrite``.
    """
    from multitune.adapters.export import SOURCES, _take_weights
    from multitune.model import MultiTaskModel

    if source not in SOURCES:
        raise MultituneError(f"--from: expected one of {', '.join(SOURCES)}, got {source!r}")
    if fmt not in FORMATS:
        raise MultituneError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    run, output = Path(run), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise MultituneError(f"{output}: exists and is not empty (pass --overwrite to replace it)")
    model = MultiTaskModel.load(run)
    if task is None and fmt != "onnx":
        raise MultituneError(f"--task: required for --format {fmt}; the model's tasks: {', '.join(model.tasks)}")
    if task is not None and task not in model.tasks:
        raise MultituneError(f"{run}: the model has no task {task!r}; its tasks: {', '.join(model.tasks)}")
    if merge and model.adapters is None:
        raise MultituneError(f"--merge: the model in {run} has no adapters to fold into the backbone; leave "
                             f"--merge out to export task {task!r} with its fine-tuned backbone")
    if model.adapters is not None and task in model.adapters.fusion_targets:
        raise MultituneError(f"task {task!r} uses AdapterFusion over every task's adapter; it has no "
                             f"single-adapter export, deploy the run's model directory")
    origin = _take_weights(run, model, task, source) if task is not None else {"source": "final", "step": None}
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if merge:
            adapters = model.adapters
            adapters.remove_hooks()
            adapters.merge_into(model.backbone, task)
            model.adapters = None
        if fmt == "onnx":
            from multitune.onnx.export import export_onnx

            details = export_onnx(model, tmp, tasks=None if task is None else [task])
        elif model.adapters is not None:
            from multitune.adapters.export import base_model_path, export_adapter

            tmp.mkdir(parents=True)
            details = export_adapter(model, task, tmp, origin, base_model_path(_meta(run)))
        else:
            details = _export_hf(run, model, task, tmp, output, origin, merged=merge)
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(output), "task": task, "format": fmt, "merged": merge, **origin, **details,
            "files": sorted(f.name for f in output.iterdir()), "bytes": _size(output)}


def _export_hf(run: Path, model: Any, task: str, tmp: Path, output: Path, origin: dict, merged: bool) -> dict:
    from multitune.adapters.export import _write_eval_config
    from multitune.export.hf import write_task_model
    from multitune.export.sentence_transformers import write_sentence_transformers_layout
    from multitune.export.usage import export_card
    from multitune.model import HEADS_FILE, MODEL_FILE, MultiTaskModel

    single = MultiTaskModel(model.backbone, {task: model.tasks[task]}, model.tokenizer, model.pooling,
                            model.normalize_embeddings, model.max_length, architecture=model.architecture.type_name)
    single.heads[task].load_state_dict(model.heads[task].state_dict())
    tmp.mkdir(parents=True)
    report = write_task_model(single, task, tmp)
    # clients that truncate (pipeline(..., truncation=True), sentence-transformers) cut where multitune does
    model.tokenizer.model_max_length = single.max_length
    model.tokenizer.save_pretrained(tmp)
    if single.architecture.type_name == "encoder" and report["kind"] != "generation":
        write_sentence_transformers_layout(tmp, "", single.pooling, single.normalize_embeddings, single.max_length,
                                           single.hidden_size)
    heads = {k: v.detach().cpu().contiguous() for k, v in single.heads.state_dict().items()}
    save_file(heads, str(tmp / HEADS_FILE), metadata={"format": "multitune-heads"})
    meta = _meta(run)
    extra = {"exported_from": str(run), "exported_task": task, "exported_source": origin["source"],
             "exported_step": origin["step"], "export": report.pop("export")}
    if merged:
        extra["merged_adapter"] = meta.get("adapters", {}).get("method")
    if "backbone_source" in meta:
        extra["backbone_source"] = meta["backbone_source"]
    meta = {**single.metadata(), **extra}
    write_json_atomic(tmp / MODEL_FILE, meta)
    _write_eval_config(run, task, tmp, output, single.architecture.type_name, origin)
    if report["kind"] == "generation":
        report["task_specific_params"] = single.tasks[task].export_spec().config["task_specific_params"][task]
    export_card(tmp, output, run, task, meta, {**origin, **report})
    return report


def _meta(run: Path) -> dict:
    import json

    from multitune.model import MODEL_FILE

    for path in (run / "model" / MODEL_FILE, run / MODEL_FILE):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
