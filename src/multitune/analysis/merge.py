"""``multitune merge RUN --tasks a,b --method ties --output DIR``: the per-task LoRA adapters of a run merged
into one adapter that every merged task uses, each task keeping its own head, and scored against the per-task
adapters.

The run must have trained one LoRA adapter per task (``adapters: {method: lora, arrangement: per_task}``). Each
task's adapter and head are taken from its own best validation step (``source="per-task-best"``, the default,
as ``multitune export`` takes them) or from the run's model (``final``); each task is evaluated with them on
its validation (and test) data, exactly as ``multitune evaluate`` splits it. The adapters are merged through
PEFT (:func:`multitune.adapters.merge.merge_lora`) and the merged model is evaluated on the same data.

``DIR`` (written to a temporary directory, then renamed) is a run-like directory that ``multitune predict``,
``evaluate`` and ``serve`` and ``multitune.load`` read:

- ``model/``: a multitune model with the merged tasks, one ``shared`` LoRA adapter (the merge) and each task's
  head;
- ``config.yaml``: the run's config narrowed to the merged tasks and the merged adapter;
- ``merge.json``: method, weights, density, ranks, and per task and split the per-task adapter's metrics, the
  merged adapter's and their difference; ``merge.md``: the same as tables.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from multitune.adapters import AdapterConfig
from multitune.adapters.merge import MERGE_METHODS, PEFT_COMBINATIONS, PRUNING_METHODS, merge_lora
from multitune.config.loader import parse_config, read_yaml
from multitune.config.parse import from_dict, to_dict
from multitune.errors import ConfigError, MultituneError
from multitune.evaluation.evaluator import evaluate_task
from multitune.fileio import replace_dir, write_json_atomic, write_text_atomic
from multitune.model import MODEL_FILE, MultiTaskModel
from multitune.rundir import check_output_dir, lock_dir, lock_scope, write_marker
from multitune.tasks import TASKS
from multitune.tasks.prepared import read_task_data
from multitune.training.per_task import find_snapshot, load_snapshot
from multitune.training.progress import stderr_console
from multitune.training.run_dir import CHECKPOINTS

MERGE_FILE = "merge.json"
SOURCES = ("per-task-best", "final")
SPLITS = ("validation", "test")
# read_task_data seeds task i's data with seed + SPLIT_SEED_STRIDE * i (as multitune.export.task does)
SPLIT_SEED_STRIDE = 7919


def merge_label(method: str) -> str:
    """How a merge is named next to runs (``multitune compare``)."""
    return f"merge of single-task adapters ({method})"


def _run_meta(run: Path) -> dict:
    """The run's ``model/multitune.json``.

    Raises:
        MultituneError: ``run`` is not a run directory with a model.
    """
    if not (run / "config.yaml").is_file() or not (run / "model" / MODEL_FILE).is_file():
        raise MultituneError(f"{run}: not a run directory (it needs config.yaml and model/{MODEL_FILE}); merge takes "
                             f"the directory of a finished run")
    try:
        meta = json.loads((run / "model" / MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MultituneError(f"{run / 'model' / MODEL_FILE}: cannot read the model's metadata: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), dict):
        raise MultituneError(f"{run / 'model' / MODEL_FILE}: not a multitune model's metadata")
    return meta


def check_merge_request(run: Path, meta: dict, tasks: Sequence[str], method: str, weights: Sequence[float] | None,
                        density: float, source: str) -> tuple[list[str], list[float]]:
    """Check a merge request against the run's metadata before any model is loaded.

    Returns:
        The tasks in the run's order and their weights (default 1.0 each).

    Raises:
        MultituneError: one line each: the run has no per-task LoRA adapters, fewer than two tasks, an unknown
            or repeated task, weights that do not match the tasks, an unknown method or source, or a density
            outside (0, 1].
    """
    adapters = meta.get("adapters") or {}
    if adapters.get("method") != "lora" or adapters.get("arrangement") != "per_task":
        has = (f"method {adapters.get('method')}, arrangement {adapters.get('arrangement')}" if adapters
               else "no adapters")
        raise MultituneError(f"{run}: merge combines the LoRA adapters of a run trained with one per task "
                             f"(adapters: {{method: lora, arrangement: per_task}}); this run has {has}")
    if method not in MERGE_METHODS:
        raise MultituneError(f"--method: expected one of {', '.join(MERGE_METHODS)}, got {method!r}")
    if source not in SOURCES:
        raise MultituneError(f"--from: expected one of {', '.join(SOURCES)}, got {source!r}")
    if method in PRUNING_METHODS and not 0.0 < density <= 1.0:
        raise MultituneError(f"--density: expected the share of each update kept, in (0, 1], got {density}")
    names = list(meta["tasks"])
    if len(tasks) != len(set(tasks)):
        twice = next(t for t in tasks if list(tasks).count(t) > 1)
        raise MultituneError(f"--tasks: task {twice!r} is named twice")
    for task in tasks:
        if task not in names:
            close = difflib.get_close_matches(task, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MultituneError(f"--tasks: the run {run} has no task {task!r}{hint}; its tasks: {', '.join(names)}")
    if len(tasks) < 2:
        raise MultituneError(f"--tasks: merge needs at least two tasks, got {len(tasks)}; the run's tasks: "
                             f"{', '.join(names)}")
    given = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
    if len(given) != len(tasks):
        raise MultituneError(f"--weights: {len(given)} weights for {len(tasks)} tasks; give one per task, in the "
                             f"order of --tasks")
    order = sorted(range(len(tasks)), key=lambda i: names.index(tasks[i]))
    return [tasks[i] for i in order], [given[i] for i in order]


def _take_weights(run: Path, model: MultiTaskModel, task: str, source: str) -> dict:
    """Put ``task``'s own best-step snapshot over ``model`` when asked for and present; say which weights."""
    snapshot = find_snapshot(run / CHECKPOINTS, task) if source == "per-task-best" else None
    if snapshot is None:
        return {"source": "final"}
    return {"source": "per-task-best", "step": load_snapshot(snapshot, model, task)["step"]}


def _rows(config: Any, per_task: dict, merged: dict) -> dict[str, dict]:
    """Per task and split: the main metric, both models' metrics and the difference (merged minus per-task)."""
    rows: dict[str, dict] = {}
    for task, splits in per_task.items():
        impl = TASKS.get(config.tasks[task].type)
        for split, own in splits.items():
            other = merged[task][split]
            main = impl.main_metric_in(own, config.tasks[task])
            rows.setdefault(task, {})[split] = {
                "metric": main, "greater_is_better": impl.greater_is_better_for(main),
                "per_task": own, "merged": other, "delta": other[main] - own[main]}
    return rows


def _merged_config(run: Path, output: Path, tasks: list[str], adapters: AdapterConfig, family: str) -> str:
    """``config.yaml`` of the merge: the run's config narrowed to the merged tasks, with the merged adapter and
    the merge's own model as the backbone, so that ``multitune evaluate DIR`` scores it."""
    raw = read_yaml(run / "config.yaml")
    order = list(raw.get("tasks") or {})
    indices = [order.index(t) for t in tasks]
    contiguous = indices == list(range(indices[0], indices[0] + len(indices)))
    seed = int(raw.get("seed", 42)) + (SPLIT_SEED_STRIDE * indices[0] if contiguous else 0)
    kept = {k: raw[k] for k in ("pooling", "normalize_embeddings", "freeze", "trust_remote_code") if k in raw}
    narrowed = {"backbone": {"type": family, "name": str((output / "model" / "backbone").resolve())},
                "output_dir": str(output.resolve()), "seed": seed, **kept,
                "tasks": {t: raw["tasks"][t] for t in tasks}, "adapters": to_dict(adapters),
                "training": {**(raw.get("training") or {}), "early_stopping": None}}
    try:
        config = parse_config(narrowed, check_files=False)
    except ConfigError as exc:
        raise MultituneError(f"{run / 'config.yaml'}: cannot derive the merge's config: {exc}") from None
    note = ("the seed is the run's plus 7919 x the first task's index in the run, so that splits carved out of "
            "train hold the run's examples" if contiguous else
            "the merged tasks are not next to each other in the run, so splits carved out of train (data.split) "
            "can hold other examples than the run's; merge.json scores the run's splits")
    header = (f"# a merge of the per-task LoRA adapters of {run.resolve()} ({', '.join(tasks)}).\n"
              f"# `multitune evaluate {output}` scores it on the tasks' data; {note}.\n")
    return header + yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def merge_run(run: str | Path, tasks: Sequence[str], method: str, output: str | Path,
              weights: Sequence[float] | None = None, density: float = 0.5, seed: int = 0,
              source: str = "per-task-best", overwrite: bool = False, console: Console | None = None) -> dict:
    """Merge the per-task LoRA adapters of ``tasks`` in ``run`` and write the merged model with its evaluation
    to ``output`` (see the module docstring).

    Args:
        run: a run directory trained with ``adapters: {method: lora, arrangement: per_task}``.
        tasks: the tasks whose adapters are merged (at least two).
        method: ``linear``, ``ties``, ``dare`` or ``dare_ties`` (see :mod:`multitune.adapters.merge`).
        output: the directory to write.
        weights: one weight per task, in the order of ``tasks`` (default: 1.0 each).
        density: ``ties`` / ``dare`` / ``dare_ties``: the share of each update's entries kept.
        seed: seed of DARE's random drop.
        source: ``per-task-best`` (each task's own best step, when the run kept it) or ``final``.
        overwrite: replace a non-empty ``output`` that multitune wrote.
        console: where progress goes (default: stderr).

    Returns:
        The content of ``merge.json``.

    Raises:
        MultituneError: a request that does not fit the run (:func:`check_merge_request`), a non-empty
            ``output`` without ``overwrite``, or a run whose data or model cannot be read.
    """
    run, output = Path(run), Path(output)
    meta = _run_meta(run)
    names, weights = check_merge_request(run, meta, list(tasks), method, weights, density, source)
    check_output_dir(output, overwrite=overwrite, resume=False, protected=(run,), field="--output", kind="merge")
    console = console or stderr_console()
    config = parse_config(read_yaml(run / "config.yaml"))
    console.print(f"merge: loading {run}")
    model = MultiTaskModel.load(run)
    prepared = read_task_data(config, {n: model.tasks[n] for n in config.tasks})
    tcfg = config.training
    pad = model.tokenizer.pad_token_id or 0
    data = {t: {s: (model.tasks[t].encode(prepared[t].data.splits[s], model.tokenizer, model.max_length),
                    prepared[t].data.splits[s]) for s in SPLITS if s in prepared[t].data.splits} for t in names}
    missing = [t for t in names if not data[t]]
    if missing:
        raise MultituneError(f"{run}: task {missing[0]!r} has no validation or test data to score the merge on")

    def evaluate(m: MultiTaskModel, task: str) -> dict[str, dict]:
        return {s: evaluate_task(m, m.tasks[task], feats, examples, tcfg.eval_batch_size or 2 * tcfg.batch_size,
                                 pad, tcfg.eval_batch_tokens)[0] for s, (feats, examples) in data[task].items()}

    # each task with its own adapter and head (from its own best step when asked), evaluated, then kept
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(("heads.", "adapters."))}
    per_task, origins, factors, heads, states = {}, {}, [], {}, {}
    for i, task in enumerate(names, 1):
        model.load_state_dict(initial, strict=False)
        origins[task] = _take_weights(run, model, task, source)
        step = f", step {origins[task]['step']}" if "step" in origins[task] else ""
        console.print(f"merge: [{i}/{len(names)}] {task}: evaluating its own adapter ({origins[task]['source']}{step})")
        per_task[task] = evaluate(model, task)
        factors.append({p: (ad.lora_A.detach().clone(), ad.lora_B.detach().clone())
                        for p, ad in model.adapters.modules_by_site(task).items()})
        heads[task] = {k: v.detach().clone() for k, v in model.heads[task].state_dict().items()}
        states[task] = model.tasks[task].state()

    console.print(f"merge: merging {len(names)} adapters with {method} (peft {PEFT_COMBINATIONS[method]})")
    rank_each = int(model.adapters.config.r)
    combined, rank = merge_lora(factors, [model.adapters.method.scaling] * len(names), weights, method, density, seed)
    entry = {**to_dict(model.adapters.config), "arrangement": "shared", "r": rank, "alpha": float(rank)}
    adapter_config = from_dict(AdapterConfig, entry, "adapters")
    model.adapters.remove_hooks()
    for task in names:
        model.tasks[task].load_state(states[task])
    merged = MultiTaskModel(model.backbone, {t: model.tasks[t] for t in names}, model.tokenizer, model.pooling,
                            model.normalize_embeddings, model.max_length, architecture=model.architecture.type_name,
                            adapters=adapter_config)
    with torch.no_grad():
        for task in names:
            merged.heads[task].load_state_dict(heads[task])
        for path, ad in merged.adapters.modules_by_site(names[0]).items():
            ad.lora_A.copy_(combined[path][0])
            ad.lora_B.copy_(combined[path][1])
    merged.eval()
    merged_metrics = {}
    for i, task in enumerate(names, 1):
        console.print(f"merge: [{i}/{len(names)}] {task}: evaluating the merged adapter")
        merged_metrics[task] = evaluate(merged, task)

    report = {
        "run": str(run), "output": str(output), "label": merge_label(method), "method": method,
        "peft_combination_type": PEFT_COMBINATIONS[method], "tasks": names,
        "weights": dict(zip(names, weights)), "density": density if method in PRUNING_METHODS else None,
        "seed": seed if method in ("dare", "dare_ties") else None,
        "rank": {"per_task": rank_each, "merged": rank}, "sites": len(combined), "source": origins,
        "results": _rows(config, per_task, merged_metrics)}
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with lock_scope():
        lock_dir(output.parent)  # one merge at a time into this folder
        check_output_dir(output, overwrite=overwrite, resume=False, protected=(run,), field="--output", kind="merge")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            merged.save(tmp / "model", extra={"backbone_source": meta.get("backbone_source"),
                                              "merged_from": {"run": str(run.resolve()), "method": method,
                                                              "tasks": names}})
            write_text_atomic(tmp / "config.yaml", _merged_config(run, output, names, adapter_config,
                                                                  merged.architecture.type_name))
            write_json_atomic(tmp / MERGE_FILE, report)
            write_text_atomic(tmp / "merge.md", render_markdown(report))
            write_marker(tmp, "merge")
            replace_dir(tmp, output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    console.print(render_markdown(report, summary_only=True))
    console.print(f"merge written to {output} (model/, config.yaml, {MERGE_FILE}, merge.md)")
    return report


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_markdown(report: dict, summary_only: bool = False) -> str:
    """``merge.md`` (or, with ``summary_only``, just its per-task tables)."""
    lines: list[str] = []
    for split in SPLITS:
        rows = {t: r[split] for t, r in report["results"].items() if split in r}
        if not rows:
            continue
        lines += [f"### Per-task {split} metrics: own adapter vs {report['label']}", "",
                  "| task | metric | own adapter | merged adapter | delta |", "|---|---|---|---|---|"]
        for task, r in rows.items():
            arrow = "" if r["greater_is_better"] else " (lower is better)"
            lines.append(f"| {task} | {r['metric']}{arrow} | {_fmt(r['per_task'][r['metric']])} | "
                         f"{_fmt(r['merged'][r['metric']])} | {r['delta']:+.4f} |")
        lines.append("")
    if summary_only:
        return "\n".join(lines)
    weights = ", ".join(f"{t} {w:g}" for t, w in report["weights"].items())
    pruning = f"; density {report['density']:g}" if report["density"] is not None else ""
    seed = f"; seed {report['seed']}" if report["seed"] is not None else ""
    sources = ", ".join(f"{t} {o['source']}" + (f" (step {o['step']})" if "step" in o else "")
                        for t, o in report["source"].items())
    head = ["# multitune merge", "",
            f"Run: `{report['run']}`. Method: {report['method']} (peft `{report['peft_combination_type']}`); "
            f"weights: {weights}{pruning}{seed}.", "",
            f"LoRA rank: {report['rank']['per_task']} per task, {report['rank']['merged']} merged, on "
            f"{report['sites']} layers. Each task's own adapter and head: {sources}.", "",
            "Delta = merged minus own adapter; every task keeps its own head.", ""]
    return "\n".join(head + lines)
