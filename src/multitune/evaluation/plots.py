"""Plots of a run: learning curves of every task's validation metrics and training losses."""

from __future__ import annotations

from pathlib import Path


def plot_learning_curves(records: list[dict], path: Path) -> Path | None:
    """Write a PNG with one panel per task (validation metrics over steps) plus the training losses.

    Returns:
        The written path, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    if not evals and not trains:
        return None
    tasks = sorted({t for r in evals for t in r["metrics"]})
    panels = len(tasks) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric_names = sorted({m for r in evals for m in r["metrics"].get(task, {})
                               if "/" not in m} - {"mse", "loss", "perplexity"})
        for m in metric_names:
            pts = [(r["step"], r["metrics"][task][m]) for r in evals if m in r["metrics"].get(task, {})]
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_title(f"{task} (validation)")
        ax.set_xlabel("step")
        if metric_names:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for task in sorted({t for r in trains for t in r["loss"]}):
        pts = [(r["step"], r["loss"][task]) for r in trains if task in r["loss"]]
        ax.plot(*zip(*pts), label=task)
    ax.set_title("training loss")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[1]:  # no training-loss lines when the run logged none yet
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
