"""``multitune compare CONFIG``: the multi-task run against each task trained alone, with the same budget.

Runs (each through :func:`multitune.training.train`, in ``OUTPUT/``):

1. ``multitask``: the config as given, with gradient affinity sampled during training
   (``analysis.affinity_every``; when the config leaves it at 0, every ``max(1, max_steps // 20)`` steps);
2. ``single-<task>`` for each task: the same run restricted to that task. The budget per task is the number of
   batches of the task that the multi-task run drew (``results.json`` ``train.batches``): the single-task run
   makes ``ceil(batches / gradient_accumulation_steps)`` optimizer steps, so it sees as many batches of its task
   (a strategy that takes one batch of every task per step gives every task ``max_steps`` batches; a sampler
   gives each task its share). Everything else is as in the multi-task run: seed, backbone, optimizer and
   schedule settings (over its own number of steps), precision, adapters. The run keeps every task of the
   config, the way a stage of sequential training does, and trains and evaluates only its own: the data
   (splits, sampled subsets), the initial weights of the backbone and of the task's head and the task's batch
   stream are those of the multi-task run. What changes: the sampler (there is one task) and the loss weighting
   (``sum``: a single loss has nothing to balance), ``analysis`` is off, and an early-stopping metric that names
   another task becomes ``mean`` (the task's own main metric). Its model directory holds the other tasks'
   heads untrained.

With ``merges`` (directories written by ``multitune merge``), each merge's merged-adapter metrics join the
comparison as one more row, labelled ``merge of single-task adapters (<method>)``, next to the multi-task and
single-task runs (``merges`` in ``compare.json``, a table per split in ``compare.md``).

Outputs: ``compare.json`` (everything), ``compare.md`` (per-task table: multi-task, single-task, delta and
positive/negative transfer; the affinity matrices; suggested task groups), ``compare.png`` (the deltas) and
``affinity.png`` (the mean cosine and TAG matrices of the multi-task run). With three or more tasks, groups of
tasks are suggested from the mean TAG affinities (:func:`suggest_groups`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from multitune.analysis.merge import MERGE_FILE
from multitune.config.loader import load_config
from multitune.config.schema import AnalysisConfig, RunConfig
from multitune.data.fingerprint import data_files
from multitune.errors import ConfigError, MultituneError
from multitune.fileio import write_json_atomic, write_text_atomic
from multitune.rundir import check_output_dir, clear_dir, lock_dir, lock_scope, write_marker
from multitune.sampling import SAMPLERS
from multitune.tasks import TASKS
from multitune.training import StagePlan, train
from multitune.training.affinity import Matrix, plot_affinity
from multitune.training.progress import stderr_console
from multitune.weighting import WEIGHTINGS

AFFINITY_SAMPLES = 20  # measurements in the multi-task run when the config does not set analysis.affinity_every
MAX_GROUPING_TASKS = 10  # exhaustive search over set partitions: Bell(10) = 115,975 partitions


def default_affinity_every(max_steps: int) -> int:
    return max(1, max_steps // AFFINITY_SAMPLES)


def single_task_steps(batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps of a single-task run that sees ``batches`` batches of its task."""
    return math.ceil(batches / gradient_accumulation_steps)


def single_task_config(config: RunConfig, task: str, steps: int, output_dir: Path) -> RunConfig:
    """The single-task run of ``task`` (see the module docstring): ``config`` with ``steps`` optimizer steps."""

    single = copy.deepcopy(config)
    single.output_dir = str(output_dir)
    single.analysis = AnalysisConfig()
    single.sampling = SAMPLERS.get("proportional").config_class()
    single.loss_weighting = WEIGHTINGS.get("sum").config_class()
    t = single.training
    t.max_steps = steps
    t.eval_every = min(t.eval_every, steps)
    if t.early_stopping is not None and t.early_stopping.metric != "mean" \
            and t.early_stopping.metric.split("/")[0] != task:
        t.early_stopping = dataclasses.replace(t.early_stopping, metric="mean")
    return single


def _partitions(items: Sequence[str]) -> Iterator[list[list[str]]]:
    """Every partition of ``items`` into non-empty groups (each once; groups in order of their first item)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in _partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1:]]


def suggest_groups(affinity: Matrix, max_groups: int | None = None) -> dict:
    """The partition of the tasks into at most ``max_groups`` groups (default: any number) that maximises the
    total within-group symmetric affinity ``sum over pairs i < j in a group of (Z[i][j] + Z[j][i])``, by
    exhaustive search (at most :data:`MAX_GROUPING_TASKS` tasks). An undefined affinity counts as 0. Ties go to
    fewer groups.

    Returns:
        ``{"groups": [[task, ...], ...], "score": total}``, groups and their tasks in the matrix's task order.

    Raises:
        ValueError: more than :data:`MAX_GROUPING_TASKS` tasks.
    """
    tasks = list(affinity)
    if len(tasks) > MAX_GROUPING_TASKS:
        raise ValueError(f"grouping searches every partition: at most {MAX_GROUPING_TASKS} tasks, got {len(tasks)}")

    def z(i: str, j: str) -> float:
        value = affinity.get(i, {}).get(j)
        return 0.0 if value is None or not math.isfinite(value) else float(value)

    pair = {(i, j): z(i, j) + z(j, i) for a, i in enumerate(tasks) for j in tasks[a + 1:]}
    best: tuple[float, int] | None = None
    chosen: list[list[str]] = [list(tasks)]
    for partition in _partitions(tasks):
        if max_groups is not None and len(partition) > max_groups:
            continue
        score = sum(pair[(g[a], j)] for g in partition for a in range(len(g)) for j in g[a + 1:])
        key = (score, -len(partition))
        if best is None or key > best:
            best, chosen = key, partition
    order = {t: k for k, t in enumerate(tasks)}
    groups = sorted((sorted(g, key=order.__getitem__) for g in chosen), key=lambda g: order[g[0]])
    return {"groups": groups, "score": best[0] if best is not None else 0.0}


def grouping_table(affinity: Matrix) -> dict[str, dict]:
    """The best grouping with at most k groups, for every k from 1 to the number of tasks."""
    return {str(k): suggest_groups(affinity, k) for k in range(1, len(affinity) + 1)}


def _task_rows(config: RunConfig, multi: Mapping[str, Any], single: Mapping[str, Mapping[str, Any]], split: str
               ) -> dict[str, dict]:

    rows = {}
    for task, results in single.items():
        m, s = multi.get(split, {}).get(task), results.get(split, {}).get(task)
        if m is None or s is None:
            continue
        task_cls = TASKS.get(config.tasks[task].type)
        main = task_cls.main_metric_in(m, config.tasks[task])
        greater = task_cls.greater_is_better_for(main)
        delta = m[main] - s[main]
        gain = delta if greater else -delta
        rows[task] = {
            "metric": main, "greater_is_better": greater, "multitask": m[main], "single": s[main], "delta": delta,
            "transfer": "positive" if gain > 0 else "negative" if gain < 0 else "none",
            "metrics": {k: {"multitask": m[k], "single": s[k], "delta": m[k] - s[k]}
                        for k in m if k in s and isinstance(m[k], (int, float)) and isinstance(s[k], (int, float))}}
    return rows


def read_merges(directories: Sequence[str | Path]) -> list[dict]:
    """The ``merge.json`` of each directory written by ``multitune merge``, with ``dir`` added.

    Raises:
        MultituneError: a directory without a readable ``merge.json``.
    """
    merges = []
    for directory in directories:
        file = Path(directory) / MERGE_FILE
        try:
            merge = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = "no such file" if isinstance(exc, FileNotFoundError) else " ".join(str(exc).split())
            raise MultituneError(f"--merge: {file}: cannot read a merge ({why}); give a directory written by "
                                 f"multitune merge") from None
        if not isinstance(merge, dict) or not isinstance(merge.get("results"), dict) or "label" not in merge:
            raise MultituneError(f"--merge: {file}: not the merge.json of multitune merge")
        merges.append({**merge, "dir": str(directory)})
    return merges


def _merge_rows(merges: Sequence[Mapping[str, Any]], rows: Mapping[str, dict], split: str) -> list[dict]:
    """Each merge's merged-adapter value of the comparison's main metric, per task it merged."""
    out = []
    for merge in merges:
        values = {}
        for task, row in rows.items():
            value = (merge["results"].get(task) or {}).get(split, {}).get("merged", {}).get(row["metric"])
            if isinstance(value, (int, float)):
                values[task] = {"value": value, "delta_vs_multitask": value - row["multitask"],
                                "delta_vs_single": value - row["single"]}
        if values:
            out.append({"label": merge["label"], "dir": merge["dir"], "tasks": values})
    return out


def compare(config: RunConfig, output: str | Path | None = None, overwrite: bool = False,
            console: Console | None = None, progress: bool = True, config_path: str | None = None,
            merges: Sequence[str | Path] = ()) -> dict:
    """Train the multi-task run and every task alone with the same budget; write the comparison.

    Args:
        config: a validated run config with at least two tasks.
        output: the comparison's directory (default: the config's ``output_dir`` + ``-compare``).
        overwrite: replace a non-empty ``output``.
        console: where progress and tables go (default: stderr).
        progress: show each run's live progress bar.
        config_path: the config file, recorded in ``compare.json``.
        merges: directories written by ``multitune merge`` to show as rows next to the runs.

    Returns:
        The content of ``compare.json``.

    Raises:
        ConfigError, DataError, MultituneError: as :func:`multitune.training.train`; a config with one task,
            with ``stages`` or with AdapterFusion; a non-empty ``output`` without ``overwrite``.
    """

    console = console or stderr_console()
    if len(config.tasks) < 2:
        raise ConfigError("tasks", "compare needs at least two tasks (it trains them together and each alone)")
    if config.runs_in_stages:
        if config.stages:
            raise ConfigError("stages", "compare trains one multi-task run against single-task runs; remove "
                                        "stages")
        raise ConfigError("adapters.arrangement", f"compare does not support {config.adapters.arrangement} (a "
                                                  f"run in stages); use per_task or shared adapters")
    merge_reports = read_merges(merges)  # before hours of training
    out = Path(output) if output is not None else Path(f"{config.output_dir}-compare")
    protected = (*([Path(config_path)] if config_path else []), *data_files(config))
    owned = check_output_dir(out, overwrite=overwrite, resume=False, protected=protected, field="--output",
                             kind="comparison")
    with lock_scope():  # one writer; the runs inside take their own locks
        lock_dir(out)
        if owned:
            clear_dir(out, protected)
        write_marker(out, "comparison")
        tasks = list(config.tasks)
        total = 1 + len(tasks)

        multi_cfg = copy.deepcopy(config)
        multi_cfg.output_dir = str(out / "multitask")
        chosen_every = multi_cfg.analysis.affinity_every == 0
        if chosen_every:
            multi_cfg.analysis.affinity_every = default_affinity_every(multi_cfg.training.max_steps)
        console.rule(f"compare: run 1/{total}, multi-task ({', '.join(tasks)}) -> {multi_cfg.output_dir}")
        try:
            multi = train(multi_cfg, overwrite=True, console=console, progress=progress)
        except ConfigError as exc:
            if not (chosen_every and exc.path == "analysis.affinity_every"):
                raise
            console.print(f"[yellow]note:[/] no gradient affinity: {exc.args[0]}")  # e.g. per-task adapters
            multi_cfg.analysis.affinity_every = 0
            multi = train(multi_cfg, overwrite=True, console=console, progress=progress)

        accumulation = config.training.gradient_accumulation_steps
        budget: dict[str, dict] = {}
        single: dict[str, dict] = {}
        for k, task in enumerate(tasks, 2):
            batches = int(multi["train"]["batches"][task])
            steps = single_task_steps(batches, accumulation)
            run_dir = out / f"single-{task}"
            budget[task] = {"multitask_batches": batches, "single_steps": steps, "run": run_dir.name}
            if steps == 0:
                console.rule(f"compare: run {k}/{total}, single-task {task}: skipped (the multi-task run drew no "
                             f"batch of it)")
                continue
            console.rule(f"compare: run {k}/{total}, single-task {task}: {steps} steps ({batches} batches, as in the "
                         f"multi-task run) -> {run_dir}")
            single[task] = train(single_task_config(config, task, steps, run_dir), overwrite=True, console=console,
                                 progress=progress, plan=StagePlan(active=[task], seen=[task]))
            budget[task]["single_batches"] = int(single[task]["train"]["batches"][task])

        report: dict[str, Any] = {
            "config": config_path, "output": str(out), "tasks": tasks, "seed": config.seed,
            "budget": {"definition": "each single-task run sees as many batches of its task as the multi-task run drew "
                                     "(single_steps = ceil(multitask_batches / gradient_accumulation_steps))",
                       "gradient_accumulation_steps": accumulation, "tasks": budget},
            "runs": {"multitask": {"dir": "multitask", "steps": multi["train"]["steps"],
                                   "wall_s": multi["train"]["wall_s"]},
                     **{f"single-{t}": {"dir": f"single-{t}", "steps": r["train"]["steps"], "wall_s": r["train"]["wall_s"]}
                        for t, r in single.items()}},
            "validation": _task_rows(config, multi, single, "validation"),
        }
        test = _task_rows(config, multi, single, "test")
        if test:
            report["test"] = test
        if merge_reports:
            report["merges"] = {split: _merge_rows(merge_reports, report[split], split)
                                for split in ("validation", "test") if split in report}
        transfer = multi.get("transfer")
        if transfer is not None:
            report["transfer"] = transfer
            if len(tasks) >= 3 and len(tasks) <= MAX_GROUPING_TASKS:
                table = grouping_table(transfer["tag"])
                report["groups"] = {"by_max_groups": table, "suggested": table[str(len(tasks))],
                                    "criterion": "maximise the sum over pairs in a group of TAG[i][j] + TAG[j][i] "
                                                 "(mean look-ahead affinities of the multi-task run)"}
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "compare.json", report)
        write_text_atomic(out / "compare.md", render_markdown(report))
        _plot_outputs(report, out)
        console.print(render_markdown(report, summary_only=True))
        console.print(f"comparison written to {out} (compare.json, compare.md, compare.png"
                      + (", affinity.png)" if transfer is not None else ")"))
        return report


def run_compare(config_path: str, output: str | None = None, overrides: Sequence[str] = (), overwrite: bool = False,
                progress: bool = True, console: Console | None = None, merges: Sequence[str | Path] = ()) -> dict:
    """``multitune compare``: load the config (with ``--set`` overrides) and :func:`compare`."""

    config = load_config(config_path, list(overrides))
    return compare(config, output, overwrite=overwrite, console=console, progress=progress, config_path=config_path,
                   merges=merges)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value)


def _matrix_md(matrix: Matrix, digits: int) -> list[str]:
    tasks = list(matrix)
    lines = ["| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    lines += [f"| **{i}** | " + " | ".join(_fmt(matrix[i].get(j), digits) for j in tasks) + " |" for i in tasks]
    return lines


def render_markdown(report: Mapping[str, Any], summary_only: bool = False) -> str:
    """``compare.md`` (or, with ``summary_only``, just its per-task table)."""
    lines: list[str] = []
    for split in ("validation", "test"):
        rows = report.get(split)
        if not rows:
            continue
        lines += [f"### Per-task {split} metrics: multi-task vs single-task", "",
                  "| task | metric | multi-task | single-task | delta | transfer |", "|---|---|---|---|---|---|"]
        for task, r in rows.items():
            arrow = "" if r["greater_is_better"] else " (lower is better)"
            lines.append(f"| {task} | {r['metric']}{arrow} | {_fmt(r['multitask'])} | {_fmt(r['single'])} | "
                         f"{r['delta']:+.4f} | {r['transfer']} |")
        lines.append("")
        merged = (report.get("merges") or {}).get(split)
        if merged:
            lines += _runs_table(rows, merged, split)
    if summary_only:
        return "\n".join(lines)
    budget = report["budget"]
    head = ["# multitune compare", "",
            f"Config: `{report.get('config') or '-'}`; seed {report['seed']}; tasks: {', '.join(report['tasks'])}.",
            "", f"Budget: {budget['definition']}.", "",
            "| task | batches in the multi-task run | single-task steps | single-task batches |", "|---|---|---|---|"]
    head += [f"| {t} | {b['multitask_batches']} | {b['single_steps']} | {b.get('single_batches', '-')} |"
             for t, b in budget["tasks"].items()]
    head += ["", "| run | steps | training time (s) |", "|---|---|---|"]
    head += [f"| {name} | {r['steps']} | {r['wall_s']} |" for name, r in report["runs"].items()]
    head += ["", "Delta = multi-task minus single-task; transfer is positive when the multi-task run is better "
                 "(a single seed: small deltas can be noise).", ""]
    lines = head + lines
    transfer = report.get("transfer")
    if transfer:
        lines += [f"### Gradient affinity of the multi-task run (mean of {transfer['samples']} measurements)", "",
                  "Cosine similarity of the task gradients on the shared parameters:", "",
                  *_matrix_md(transfer["cosine"], 3), "",
                  "Look-ahead affinity (TAG), row i -> column j: 1 - L_j(after a step on i) / L_j(before); "
                  "positive means a step on i lowers j's loss:", "", *_matrix_md(transfer["tag"], 4), "",
                  "![affinity](affinity.png)", ""]
    groups = report.get("groups")
    if groups:
        lines += ["### Suggested task groups", "", f"Criterion: {groups['criterion']}.", "",
                  "| at most k groups | groups | score |", "|---|---|---|"]
        for k, g in groups["by_max_groups"].items():
            lines.append(f"| {k} | " + " / ".join("{" + ", ".join(x) + "}" for x in g["groups"])
                         + f" | {_fmt(g['score'])} |")
        best = groups["suggested"]
        lines += ["", "Suggested: " + " / ".join("{" + ", ".join(x) + "}" for x in best["groups"]), ""]
    lines += ["![deltas](compare.png)", ""]
    return "\n".join(lines)


def _runs_table(rows: Mapping[str, Mapping[str, Any]], merges: Sequence[Mapping[str, Any]], split: str) -> list[str]:
    """One row per run (multi-task, single-task, each merge), one column per task: its main metric."""
    tasks = list(rows)
    lines = [f"### Main {split} metric per run", "",
             "| run | " + " | ".join(f"{t} ({rows[t]['metric']})" for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|",
             "| multi-task | " + " | ".join(_fmt(rows[t]["multitask"]) for t in tasks) + " |",
             "| single-task | " + " | ".join(_fmt(rows[t]["single"]) for t in tasks) + " |"]
    for merge in merges:
        cells = [_fmt(merge["tasks"][t]["value"]) if t in merge["tasks"] else "-" for t in tasks]
        lines.append(f"| {merge['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _plot_outputs(report: Mapping[str, Any], out: Path) -> None:
    try:
        plot_deltas(report["validation"], out / "compare.png")
        transfer = report.get("transfer")
        if transfer:
            plot_affinity(transfer["cosine"], transfer["tag"], out / "affinity.png",
                          f"multi-task run: mean of {transfer['samples']} measurements")
    except ImportError:  # matplotlib is a dependency, but a broken install must not lose the comparison
        pass


def plot_deltas(rows: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Bar chart of each task's main-metric delta (multi-task minus single-task), green where the transfer is
    positive, red where it is negative."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(rows)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * max(len(tasks), 1), 3.6))
    deltas = [rows[t]["delta"] for t in tasks]
    colors = ["#2a9d5c" if rows[t]["transfer"] == "positive" else "#c0392b" if rows[t]["transfer"] == "negative"
              else "#888888" for t in tasks]
    ax.bar(range(len(tasks)), deltas, color=colors)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({rows[t]['metric']})" for t in tasks], fontsize=8)
    for x, d in enumerate(deltas):
        ax.annotate(f"{d:+.3f}", (x, d), ha="center", va="bottom" if d >= 0 else "top", fontsize=8)
    ax.set_ylabel("multi-task - single-task")
    ax.set_title("transfer per task (validation; green: positive, red: negative)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
