"""Plots of a run: learning curves of every task's validation metrics and training losses.

A run draws its plots after its model is saved, so a plot never ends a run: each plotting function is a
:func:`plotting_step`, whose failure is one warning line on stderr.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from multitune.errors import printable, shorten_message

F = TypeVar("F", bound=Callable[..., Any])


def plotting_step(what: str) -> Callable[[F], F]:
    """Make a plotting function safe to call after a run's model is saved: any failure (a broken
    matplotlib, a full disk, a label matplotlib cannot draw, memory) prints one line
    ``multitune: warning: <what> not written to <path> (<error>)`` on stderr and returns None.
    An interrupt (Ctrl-C) still stops the command."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a plot must not end a finished run
                path = signature.bind_partial(*args, **kwargs).arguments.get("path")
                where = f" to {path}" if path is not None else ""
                print(printable(shorten_message(f"multitune: warning: {what} not written{where} "
                                                f"({type(exc).__name__}: {exc})", 500)), file=sys.stderr)
                return None

        return guarded  # type: ignore[return-value]

    return wrap


def plot_label(text: object, limit: int = 40) -> str:
    """A label as a plot shows it: control characters escaped (:func:`~multitune.errors.printable`), cut to
    ``limit`` characters, and ``$`` escaped so that matplotlib never parses a label as math (an unbalanced
    ``$x^$`` would fail the whole plot)."""
    text = printable(text)
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")


@plotting_step("learning curves")
def plot_learning_curves(records: list[dict], path: Path) -> Path | None:
    """Write a PNG with one panel per task (validation metrics over steps) plus the training losses.

    Returns:
        The written path, or None when there is nothing to plot (or the plot failed: a warning line).
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


@plotting_step("sampling shares")
def plot_sampling_shares(records: list[dict], path: Path) -> Path | None:
    """Write a PNG of each task's sampling share over the steps of a run with two or more tasks.

    The shares come from every record of ``metrics.jsonl`` that holds them: eval lines (``sampling``), train
    lines of samplers whose shares change (``sampling``) and the changes an adaptive sampler logs
    (``{"kind": "sampling", "shares"}``); a share holds until the next record changes it.

    Returns:
        The written path, or None when the run has fewer than two tasks or no shares were logged (or the plot
        failed: a warning line).
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

    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
