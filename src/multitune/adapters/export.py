"""``multitune export``: one task of a trained model as a deployable directory.

Which weights: by default the task's own best validation step (``source="per-task-best"``), when the run kept
a snapshot of it (``training.per_task_best``, see :mod:`multitune.training.per_task`): the run's final model
with the task's snapshot put over it. Without a snapshot, or with ``source="final"``, the run's model
directory as it is (the checkpoint with the best selection metric). The report says which, and from which
step.

What is written:

- A model without adapters (full or partial fine-tuning, or a frozen backbone): a one-task multitune model
  directory, the backbone and the task's head (``multitune.load`` / ``predict`` work on it), with a
  ``config.yaml`` that ``multitune evaluate`` reads.
- ``merge=True``: the task's LoRA / DoRA / IA3 adapter folded into the backbone weights. The result is a
  plain transformers model directory (``AutoModel.from_pretrained`` loads it, no adapter code needed) that
  is also a one-task multitune model, as above.
- ``merge=False`` on an adapter model: the task's adapter alone, in PEFT's layout (``adapter_config.json`` +
  ``adapter_model.safetensors``; bottleneck adapters in multitune's own ``adapter.safetensors``), plus the
  task's head (``head.safetensors``) and ``task.json`` with its labels and settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from multitune.config.parse import to_dict
from multitune.errors import ConfigError, MultituneError
from multitune.fileio import replace_dir, write_text_atomic

SOURCES = ("per-task-best", "final")
# read_task_data seeds task i's data splits with seed + SPLIT_SEED_STRIDE * i: the exported one-task config
# shifts its seed by the task's index so that its carved-out validation/test splits are the run's
SPLIT_SEED_STRIDE = 7919


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def export_task(run: str | Path, task: str, output: str | Path, merge: bool = False, overwrite: bool = False,
                source: str = "per-task-best") -> dict:
    """Write ``task`` of the model in ``run`` to ``output`` (see the module docstring).

    Args:
        run: a run directory (or a model directory, which has no per-task snapshots).
        task: the task to export.
        output: the directory to write.
        merge: fold the task's adapter into the backbone (LoRA, DoRA, IA3).
        overwrite: replace a non-empty ``output``.
        source: ``per-task-best`` (the task's own best step when the run has its snapshot, else the final
            model with a ``note`` in the report) or ``final``.

    Returns:
        A report: ``output``, ``task``, ``merged``, ``source`` and ``step`` (where the weights come from;
        ``score`` and ``metrics`` for a per-task snapshot), ``files``, ``bytes`` (of the adapter files for
        an unmerged adapter export), and ``note`` when it fell back to the final model.

    Raises:
        MultituneError: no such task (naming the run and its tasks), ``--merge`` on a model without adapters,
            a method that does not merge, a snapshot that does not fit the model, or a non-empty ``output``
            without ``overwrite``.
    """
    from multitune.model import MultiTaskModel

    if source not in SOURCES:
        raise MultituneError(f"--from: expected one of {', '.join(SOURCES)}, got {source!r}")
    run, output = Path(run), Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise MultituneError(f"{output}: exists and is not empty (pass --overwrite to replace it)")
    model = MultiTaskModel.load(run)
    if task not in model.tasks:
        raise MultituneError(f"{run}: the model has no task {task!r}; its tasks: {', '.join(model.tasks)}")
    if merge and model.adapters is None:
        raise MultituneError(f"--merge: the model in {run} has no adapters to fold into the backbone; leave "
                             f"--merge out to export task {task!r} with its fine-tuned backbone")
    if model.adapters is not None and task in model.adapters.fusion_targets:
        raise MultituneError(f"task {task!r} uses AdapterFusion over every task's adapter; it has no "
                             f"single-adapter export, deploy the run's model directory")
    origin = _take_weights(run, model, task, source)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if model.adapters is None or merge:
            extra: dict[str, Any] = {"exported_from": str(run), "exported_task": task,
                                     "exported_source": origin["source"], "exported_step": origin["step"]}
            if merge:
                adapters = model.adapters
                adapters.remove_hooks()
                adapters.merge_into(model.backbone, task)
                extra["merged_adapter"] = adapters.config.method
            single = MultiTaskModel(model.backbone, {task: model.tasks[task]}, model.tokenizer, model.pooling,
                                    model.normalize_embeddings, model.max_length,
                                    architecture=model.architecture.type_name)
            single.heads[task].load_state_dict(model.heads[task].state_dict())
            single.save(tmp, extra=extra)
            _write_eval_config(run, task, tmp, output, model.architecture.type_name, origin)
            report_bytes = _size(tmp)
        else:
            tmp.mkdir(parents=True)
            if model.adapters.method.peft_type is not None:
                model.adapters.export_peft(model.backbone, task, tmp)
            else:  # no PEFT equivalent (bottleneck): multitune's own layout
                state = {f"{p}.{k}": v.detach().cpu().contiguous()
                         for p, ad in model.adapters.modules_by_site(task).items() for k, v in ad.state_dict().items()}
                save_file(state, str(tmp / "adapter.safetensors"), metadata={"format": "multitune-adapter"})
                (tmp / "adapter_config.json").write_text(json.dumps(to_dict(model.adapters.config), indent=2))
            report_bytes = _size(tmp)
            head = {k: v.detach().cpu().contiguous() for k, v in model.heads[task].state_dict().items()}
            save_file(head, str(tmp / "head.safetensors"), metadata={"format": "multitune-head"})
            cfg = to_dict(model.tasks[task].config)
            cfg.pop("data", None)
            (tmp / "task.json").write_text(json.dumps({"name": task, "config": cfg, "state": model.tasks[task].state(),
                                                      "pooling": model.pooling, "source": origin["source"],
                                                      "step": origin["step"]}, indent=2))
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(output), "task": task, "merged": merge, **origin,
            "files": sorted(f.name for f in output.iterdir()), "bytes": report_bytes}


def _take_weights(run: Path, model: Any, task: str, source: str) -> dict:
    """Put ``task``'s per-task snapshot over ``model`` when asked for and present; say where the weights
    come from (``source``, ``step``, and ``note`` on a fallback to the final model)."""
    from multitune.training.per_task import META_FILE, STATE_KEY, find_snapshot, load_snapshot
    from multitune.training.trainer import CHECKPOINTS

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


def _write_eval_config(run: Path, task: str, directory: Path, output: Path, family: str, origin: dict) -> None:
    """``config.yaml`` of the one-task model, so that ``multitune evaluate OUTPUT`` scores it on the task's
    data: the run's task section, its seed shifted so that carved-out splits are the run's, and the exported
    directory as the backbone. Not written when ``run`` has no ``config.yaml`` (a model directory)."""
    import yaml

    from multitune.config.loader import parse_config, read_yaml

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
