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
    return save_figure(fig, path)


def plot_sampling_shares(records: list[dict], path: Path) -> Path | None:
    """Write a PNG of each task's sampling share over the steps of a run with two or more tasks.

    The shares come from every record of ``metrics.jsonl`` that holds them: eval lines (``sampling``), train
    lines of samplers whose shares change (``sampling``) and the changes an adaptive sampler logs
    (``{"kind": "sampling", "shares"}``); a share holds until the next record changes it.

    Returns:
        The written path, or None when the run has fewer than two tasks or no shares were logged.
    """
    points: list[tuple[int, dict[str, float]]] = []
    for r in records:
        shares = r.get("shares") if r.get("kind") == "sampling" else r.get("sampling")
        if isinstance(shares, dict) and shares and "step" in r:
            points.append((r["step"], shares))
    tasks = sorted({t for _, s in points for t in s})
    if len(tasks) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points.sort(key=lambda p: p[0])  # stable: of several records at one step, the last logged holds
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for task in tasks:
        pts = [(step, s[task]) for step, s in points if task in s]
        steps, values = zip(*pts)
        ax.plot(steps, values, drawstyle="steps-post", marker="." if len(pts) < 30 else None, label=task)
    ax.set_title("sampling share per task")
    ax.set_xlabel("step")
    ax.set_ylabel("share of batches")
    ax.set_ylim(0, min(1.0, max(v for _, s in points for v in s.values()) * 1.1 + 0.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write ``fig`` to ``path`` atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
