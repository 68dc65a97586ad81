"""The report's own plots: loss weights, gradient statistics, task affinity over time, fusion attention.

Learning curves, sampling shares, confusion matrices, the forgetting matrix and the affinity heat maps come from
the plots the run already makes (:mod:`multitune.evaluation.plots`, :mod:`multitune.evaluation.confusion`,
:mod:`multitune.training.stages`, :mod:`multitune.training.affinity`). Every function writes one PNG atomically and returns its path, or None
when its records hold nothing to plot; a plot that fails is one warning line and None
(:func:`~multitune.evaluation.plots.plotting_step`), so the report is still written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from multitune.evaluation.plots import plot_label, plotting_step

Matrix = Mapping[str, Mapping[str, float]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write the figure beside ``path`` and rename it into place."""
    plt = _pyplot()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _lines(ax: Any, series: dict[str, list[tuple[int, float]]]) -> None:
    for label, pts in sorted(series.items()):
        steps, values = zip(*sorted(pts))
        ax.plot(steps, values, marker="." if len(pts) < 30 else None, label=plot_label(label))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if 1 < len(series) <= 12:
        ax.legend(fontsize=8)


@plotting_step("loss weights plot")
def plot_loss_weights(records: list[dict], path: Path) -> Path | None:
    """Each task's loss weight over the steps (``loss_weights`` of the train lines)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("kind") == "train":
            for task, w in (r.get("loss_weights") or {}).items():
                if _number(w):
                    series.setdefault(task, []).append((r["step"], w))
    if not series:
        return None
    fig, ax = _pyplot().subplots(figsize=(6.4, 3.6))
    _lines(ax, series)
    ax.set_title("loss weight per task")
    ax.set_ylabel("weight")
    return _save(fig, path)


def grad_stat_series(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``grad_stats`` of the train lines as stat -> line -> [(step, value)] (a plain number is one line)."""
    stats: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        if r.get("kind") != "train":
            continue
        for stat, value in (r.get("grad_stats") or {}).items():
            items = value.items() if isinstance(value, dict) else [(stat, value)]
            for line, v in items:
                if _number(v):
                    stats.setdefault(stat, {}).setdefault(str(line), []).append((r["step"], v))
    return stats


@plotting_step("gradient statistics plot")
def plot_grad_stats(records: list[dict], path: Path) -> Path | None:
    """One panel per gradient statistic the loss weighting logged (norms, cosines, conflicts, ...)."""
    stats = grad_stat_series(records)
    if not stats:
        return None
    n = len(stats)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = _pyplot().subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    for ax, (stat, series) in zip(axes.flat, sorted(stats.items())):
        _lines(ax, series)
        ax.set_title(plot_label(stat))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, path)


def is_matrix(value: Any) -> bool:
    """A mapping of rows to mappings of columns to numbers (with at least one number)."""
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(row, Mapping) for row in value.values())
            and any(_number(v) for row in value.values() for v in row.values())
            and all(_number(v) or v is None for row in value.values() for v in row.values()))


@plotting_step("heat map")
def plot_heatmap(matrix: Matrix, title: str, path: Path, xlabel: str = "", ylabel: str = "") -> Path | None:
    """An annotated heat map of ``matrix[row][column]`` (e.g. AdapterFusion attention: targets x adapters)."""
    if not is_matrix(matrix):
        return None
    rows = list(matrix)
    cols = list(dict.fromkeys(c for r in rows for c in matrix[r]))
    grid = np.array([[matrix[r].get(c) if _number(matrix[r].get(c)) else np.nan for c in cols] for r in rows],
                    dtype=float)
    fig, ax = _pyplot().subplots(figsize=(2.6 + 0.8 * len(cols), 1.6 + 0.6 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(cols)), [plot_label(c) for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [plot_label(r) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


@plotting_step("affinity over time plot")
def plot_pairs_over_time(records: list[dict], kinds: list[str], path: Path) -> Path | None:
    """Each off-diagonal pair of the ``affinity`` records' matrices over the steps, one panel per matrix."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        if r.get("kind") != "affinity":
            continue
        for name in kinds:
            matrix = r.get(name)
            if not is_matrix(matrix):
                continue
            for i, row in matrix.items():
                for j, v in row.items():
                    if i != j and _number(v):
                        panels.setdefault(name, {}).setdefault(f"{i} → {j}", []).append((r["step"], v))
    if not panels or all(len(p) == 1 for s in panels.values() for p in s.values()):
        return None  # one sample per pair: the heat map says it all
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        _lines(ax, series)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"{name} over training")
    return _save(fig, path)
