"""The forgetting matrix of a staged run (:mod:`multitune.training.plan` runs the stages): the main metric of
each task after each stage, written as JSON, markdown and a plot, and the forgetting of each task
(Chaudhry et al. 2018).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from multitune.config.schema import RunConfig
from multitune.fileio import write_json_atomic, write_text_atomic
from multitune.tasks import TASKS

FORGETTING = "forgetting"


def forgetting_matrix(config: RunConfig, stage_results: list[dict]) -> dict:
    """``forgetting.json``: the main metric of each task after each stage (``matrix``), its name per task, and
    the forgetting of each task seen in more than one stage.

    Args:
        config: the staged run's config (``stages`` expanded).
        stage_results: per stage, ``{"stage": name, "tasks": [...], "validation": task -> metrics, ...}``.
    """
    rows: dict[str, dict[str, float]] = {}  # task -> stage name -> main metric, tasks in the order first seen
    seen: list[str] = []
    for r in stage_results:
        seen += [t for t in r["tasks"] if t not in seen]
        for task in seen:
            metrics = r["validation"].get(task)
            if metrics is not None:
                main = TASKS.get(config.tasks[task].type).main_metric_in(metrics, config.tasks[task])
                rows.setdefault(task, {})[r["stage"]] = metrics[main]
    stages = [s.name for s in config.stages]
    return {"stages": stages, "metric": {t: _main_metric_name(config, t, stage_results) for t in rows},
            "matrix": rows, "forgetting": _forgetting(rows, stages)}


def write_forgetting(out: Path, forgetting: dict, console: Console) -> None:
    """``forgetting.json``, ``forgetting.md`` and ``forgetting.png`` in the run directory; the matrix on the
    console."""
    write_json_atomic(out / f"{FORGETTING}.json", forgetting)
    write_text_atomic(out / f"{FORGETTING}.md", forgetting_markdown(forgetting))
    plot_forgetting(forgetting, out / f"{FORGETTING}.png")
    _print_matrix(console, forgetting)


def _main_metric_name(config: RunConfig, task: str, stage_results: list[dict]) -> str:
    for r in stage_results:
        if task in r["validation"]:
            return TASKS.get(config.tasks[task].type).main_metric_in(r["validation"][task], config.tasks[task])
    return ""


def _forgetting(rows: dict[str, dict[str, float]], stages: list[str]) -> dict[str, float]:
    """Per task: the best value it reached after any stage minus its value after the last stage
    (Chaudhry et al. 2018). Positive means forgotten; for lower-is-better metrics read the sign reversed."""
    out = {}
    for task, by_stage in rows.items():
        values = [by_stage[s] for s in stages if s in by_stage]
        if len(values) > 1:
            out[task] = max(values[:-1]) - values[-1]
    return out


def forgetting_markdown(f: dict) -> str:
    stages = f["stages"]
    lines = ["| task (metric) | " + " | ".join(f"after {s}" for s in stages) + " | forgetting |",
             "|---|" + "---|" * (len(stages) + 1)]
    for task, by_stage in f["matrix"].items():
        cells = [f"{by_stage[s]:.4f}" if s in by_stage else "-" for s in stages]
        forget = f["forgetting"].get(task)
        lines.append(f"| {task} ({f['metric'][task]}) | " + " | ".join(cells)
                     + f" | {'-' if forget is None else f'{forget:+.4f}'} |")
    return "\n".join(lines) + "\n"


def _print_matrix(console: Console, f: dict) -> None:
    table = Table(title="forgetting matrix: main metric of each task after each stage")
    table.add_column("task")
    for s in f["stages"]:
        table.add_column(f"after {s}", justify="right")
    table.add_column("forgetting", justify="right")
    for task, by_stage in f["matrix"].items():
        forget = f["forgetting"].get(task)
        table.add_row(f"{task} ({f['metric'][task]})", *[f"{by_stage[s]:.4f}" if s in by_stage else "-"
                                                         for s in f["stages"]],
                      "-" if forget is None else f"{forget:+.4f}")
    console.print(table)


def plot_forgetting(f: dict, path: Path) -> None:
    """Heat map of the forgetting matrix (tasks x stages), values annotated."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a broken matplotlib must not lose a finished run
        return
    tasks, stages = list(f["matrix"]), f["stages"]
    grid = np.full((len(tasks), len(stages)), np.nan)
    for i, t in enumerate(tasks):
        for j, s in enumerate(stages):
            if s in f["matrix"][t]:
                grid[i, j] = f["matrix"][t][s]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(stages), 1.2 + 0.6 * len(tasks)))
    ax.imshow(np.nan_to_num(grid, nan=np.nanmin(grid) if np.isfinite(grid).any() else 0.0), cmap="viridis",
              aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(stages)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(stages)), [f"after {s}" for s in stages])
    ax.set_yticks(range(len(tasks)), [f"{t} ({f['metric'][t]})" for t in tasks])
    ax.set_title("metric of each task after each stage")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)

