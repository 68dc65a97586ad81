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

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from multitune.adapters.export import base_model_path, export_adapter, peft_usage
from multitune.backbones.sentence_transformers import write_sentence_transformers_layout
from multitune.cards import ModelCard, base_model_info, task_cards, training_summary, write_card
from multitune.config.loader import parse_config, read_yaml
from multitune.config.parse import to_dict
from multitune.errors import ConfigError, MultituneError
from multitune.export.hf import write_task_model
from multitune.export.usage import export_card, run_files
from multitune.fileio import replace_dir, write_json_atomic, write_text_atomic
from multitune.model import HEADS_FILE, MODEL_FILE, MultiTaskModel
from multitune.onnx.export import export_onnx
from multitune.rundir import MARKER, check_output_dir, lock_dir, lock_scope, write_marker
from multitune.training.per_task import META_FILE, STATE_KEY, find_snapshot, load_snapshot
from multitune.training.run_dir import CHECKPOINTS

FORMATS = ("hf", "onnx")
SOURCES = ("per-task-best", "final")
# read_task_data seeds task i's data splits with seed + SPLIT_SEED_STRIDE * i: the exported one-task config
# shifts its seed by the task's index so that its carved-out validation/test splits are the run's
SPLIT_SEED_STRIDE = 7919


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
    if source not in SOURCES:
        raise MultituneError(f"--from: expected one of {', '.join(SOURCES)}, got {source!r}")
    if fmt not in FORMATS:
        raise MultituneError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    run, output = Path(run), Path(output)
    check_output_dir(output, overwrite=overwrite, resume=False, protected=(run,), field="--output", kind="export")
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
    origin = take_weights(run, model, task, source) if task is not None else {"source": "final", "step": None}
    output.parent.mkdir(parents=True, exist_ok=True)
    scope = lock_scope()
    scope.__enter__()
    lock_dir(output.parent)  # one export at a time into this folder
    check_output_dir(output, overwrite=overwrite, resume=False, protected=(run,), field="--output", kind="export")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if merge:
            adapters = model.adapters
            adapters.remove_hooks()
            adapters.merge_into(model.backbone, task)
            model.adapters = None
        if fmt == "onnx":
            details = export_onnx(model, tmp, tasks=None if task is None else [task])
            _onnx_card(tmp, output, run, model, details)
        elif model.adapters is not None:
            tmp.mkdir(parents=True)
            details = export_adapter(model, task, tmp, origin, base_model_path(_meta(run)))
            if details["layout"] == "peft":
                _peft_card(tmp, output, run, task, model, details)
        else:
            details = _export_hf(run, model, task, tmp, output, origin, merged=merge)
        write_marker(tmp, "export")
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        scope.__exit__(None, None, None)
    return {**origin, **details, "output": str(output), "task": task, "format": fmt, "merged": merge,
            "files": sorted(f.name for f in output.iterdir() if f.name != MARKER), "bytes": _size(output)}


def _export_hf(run: Path, model: Any, task: str, tmp: Path, output: Path, origin: dict, merged: bool) -> dict:
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
    write_eval_config(run, task, tmp, output, single.architecture.type_name, origin)
    if report["kind"] == "generation":
        report["task_specific_params"] = single.tasks[task].export_spec().config["task_specific_params"][task]
    export_card(tmp, output, run, task, meta, {**origin, **report})
    return report


def _meta(run: Path) -> dict:
    for path in (run / "model" / MODEL_FILE, run / MODEL_FILE):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _peft_card(directory: Path, output: Path, run: Path, task: str, model: Any, report: dict) -> None:
    """The model card of a PEFT export: the task's metrics, the base model, and the code that loads it."""
    results, config = run_files(run)
    meta = {**model.metadata(), "backbone_source": _meta(run).get("backbone_source")}
    hub_id, license_ = base_model_info(meta["backbone_source"])
    code, notes = peft_usage(str(output.resolve()), report)
    method = model.adapters.config.method
    write_card(directory, ModelCard(
        title=f"{task}: {method} adapter", library_name="peft", base_model=hub_id, license=license_,
        summary=(f"Task `{task}` of a multitune run as a PEFT adapter on `{report['base_model_name_or_path']}` "
                 f"({report.get('source', 'final')} weights); it predicts what `multitune predict` predicts, "
                 "checked on probe inputs when it was written."),
        pipeline_tag=report["pipeline_tag"], tags=["multitune", "peft", method],
        tasks=[t for t in task_cards(meta, results, config) if t.name == task], usage=[("PEFT", code)],
        training=training_summary(config, results), notes=notes))


def take_weights(run: Path, model: Any, task: str, source: str) -> dict:
    """Put ``task``'s per-task snapshot over ``model`` when asked for and present; say where the weights
    come from (``source``, ``step``, and ``note`` on a fallback to the final model).

    Raises:
        MultituneError: the snapshot does not match the run's records or the model.
    """
    train = _run_results(run).get("train")
    train = train if isinstance(train, dict) else {}
    final = {"source": "final", "step": train.get("best_step")}
    if source == "final":
        return final
    snapshot = find_snapshot(run / CHECKPOINTS, task)
    if snapshot is None:
        return {**final, "note": f"{run} has no per-task snapshot of task {task!r} (training.per_task_best off, "
                                 f"or not a run directory): exported the final model"}
    meta = load_snapshot(snapshot, model, task)
    recorded = (train.get(STATE_KEY) or {}).get(task)
    if recorded is not None and recorded.get("step") != meta["step"]:
        raise MultituneError(f"{snapshot / META_FILE}: snapshot of step {meta['step']}, but results.json records "
                             f"task {task!r}'s best at step {recorded.get('step')}; use --from final")
    return {"source": "per-task-best", "step": meta["step"], "score": meta.get("score"),
            "metrics": meta.get("metrics")}


def _run_results(run: Path) -> dict:
    try:
        results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return results if isinstance(results, dict) else {}


def write_eval_config(run: Path, task: str, directory: Path, output: Path, family: str, origin: dict) -> None:
    """``config.yaml`` of the one-task model, so that ``multitune evaluate OUTPUT`` scores it on the task's
    data: the run's task section, its seed shifted so that carved-out splits are the run's, and the exported
    directory as the backbone. Not written when ``run`` has no ``config.yaml`` (a model directory).

    Raises:
        MultituneError: the run's config cannot be turned into the task's.
    """
    if not (run / "config.yaml").is_file():
        return
    raw = read_yaml(run / "config.yaml")
    if task not in (raw.get("tasks") or {}):
        return
    index = list(raw["tasks"]).index(task)
    training = {**raw.get("training", {}), "early_stopping": None}
    one = {"backbone": {"type": family, "name": str(output.resolve())}, "pooling": raw.get("pooling"),
           "normalize_embeddings": raw.get("normalize_embeddings", False), "output_dir": str(output.resolve()),
           "seed": raw.get("seed", 42) + SPLIT_SEED_STRIDE * index, "tasks": {task: raw["tasks"][task]},
           "training": training, "trust_remote_code": raw.get("trust_remote_code", False)}
    try:
        config = parse_config(one, check_files=False)
    except ConfigError as exc:
        raise MultituneError(f"{run / 'config.yaml'}: cannot derive the exported task's config: {exc}") from None
    header = (f"# task {task!r} exported from {run.resolve()} ({origin['source']}, step {origin['step']}).\n"
              f"# `multitune evaluate {output}` scores it on the task's data. The seed is the run's plus "
              f"{SPLIT_SEED_STRIDE} x {index}\n# (the task's index in the run), so that splits carved out of "
              f"train hold the run's examples.\n")
    write_text_atomic(directory / "config.yaml",
                      header + yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))


def _onnx_card(directory: Path, output: Path, run: Path, model: Any, report: dict) -> None:
    """The model card of an ONNX export: every task in the graph, and the code that runs it."""
    results, config = run_files(run)
    meta = json.loads((directory / "multitune.json").read_text(encoding="utf-8"))
    meta["backbone_source"] = _meta(run).get("backbone_source")
    hub_id, license_ = base_model_info(meta["backbone_source"])
    path = str(output.resolve())
    first = next(iter(meta["tasks"]))
    code = ("import multitune\n\n"
            f"model = multitune.load({path!r})  # runs on ONNX Runtime\n"
            f"print(model.predict({first!r}, ['A wonderful film .']))\n")
    raw = ("import json\n\nimport onnxruntime\nfrom transformers import AutoTokenizer\n\n"
           f"path = {path!r}\n"
           "names = json.load(open(f'{path}/onnx.json'))\n"
           "session = onnxruntime.InferenceSession(f'{path}/model.onnx', providers=['CPUExecutionProvider'])\n"
           "tokenizer = AutoTokenizer.from_pretrained(path)\n"
           "enc = tokenizer(['A wonderful film .'], return_tensors='np', truncation=True)\n"
           "feeds = {i: enc[i] for i in names['inputs']}\n"
           "print({o.name: v.shape for o, v in zip(session.get_outputs(), session.run(None, feeds))})\n")
    cards = task_cards(meta, results, config)
    write_card(directory, ModelCard(
        title=f"multitune model (ONNX): {', '.join(meta['tasks'])}", library_name="onnx",
        summary=("Every head task of a multitune run in one ONNX graph: one backbone pass, each task's outputs "
                 "named `<task>.<output>`, plus `sentence_embedding`; `onnx.json` names them and their labels."),
        base_model=hub_id, license=license_, pipeline_tag=cards[0].pipeline_tag if len(cards) == 1 else None,
        tags=["multitune", "onnx"], tasks=cards, usage=[("multitune", code), ("ONNX Runtime", raw)],
        training=training_summary(config, results)))
