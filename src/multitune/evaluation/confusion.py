"""Confusion-matrix plot of a classification task (colour normalised per gold row, counts annotated on small
matrices). A task with many labels is shown bounded: its most frequent gold labels and one ``other`` row and
column for the rest, so the plot costs the same for 30 labels or 10,000."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multitune.evaluation.plots import plot_label, plotting_step

#: labels shown one by one; a task with more shows this many plus ``other``
MAX_SHOWN_LABELS = 30
#: cells carry their count as text up to this many rows (more would be unreadable)
MAX_ANNOTATED = 20
OTHER = "other"


def bounded_confusion(labels: Sequence[str], matrix: Sequence[Sequence[int]], limit: int = MAX_SHOWN_LABELS
                      ) -> tuple[list[str], list[list[int]]]:
    """The matrix as it is when it has at most ``limit`` labels, else its ``limit`` labels with the most gold
    examples (ties: label order) plus one ``other`` row and column that sum up every other label.

    One pass over the rows (a row sum each) and ``limit`` reads per row: no copy of the full matrix.

    Args:
        labels: label names in matrix order.
        matrix: counts, ``matrix[gold][predicted]`` (lists, or anything indexable the same way).
        limit: the most labels shown one by one.

    Returns:
        ``(shown labels, counts)``; every count of ``matrix`` is in exactly one cell, so the totals agree.
    """
    n = len(labels)
    if n <= limit:
        return list(labels), [[int(v) for v in row] for row in matrix]
    totals = [int(row.total()) if hasattr(row, "total") else int(sum(row)) for row in matrix]  # sparse rows
    top = sorted(range(n), key=lambda i: (-totals[i], i))[:limit]
    slot = {gold: k for k, gold in enumerate(top)}
    out = [[0] * (limit + 1) for _ in range(limit + 1)]
    for gold, row in enumerate(matrix):
        target = out[slot.get(gold, limit)]
        shown = 0
        for k, predicted in enumerate(top):
            value = int(row[predicted])
            target[k] += value
            shown += value
        target[limit] += totals[gold] - shown
    return [labels[i] for i in top] + [OTHER], out


@plotting_step("confusion matrix")
def plot_confusion_matrix(labels: Sequence[str], matrix: Sequence[Sequence[int]], path: str | Path,
                          title: str) -> Path | None:
    """Write a PNG: rows are gold labels, columns predicted labels, each cell coloured by its share of the gold
    row (and annotated with its count when the matrix is small). Above :data:`MAX_SHOWN_LABELS` labels it
    shows :func:`bounded_confusion`. Written to a temporary file in the same directory, then renamed, so
    ``path`` is always either the old file or the complete new one.

    Args:
        labels: label names in matrix order.
        matrix: counts, ``matrix[gold][predicted]``.
        path: the PNG to write.
        title: plot title.

    Returns:
        ``path``, or None when the plot failed: it is drawn after the model is saved, so a failure is one
        warning line on stderr, never the end of the run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown, counts = bounded_confusion(labels, matrix)
    m = np.asarray(counts, dtype=float).reshape(len(shown), len(shown))
    norm = m / np.clip(m.sum(axis=1, keepdims=True), 1, None)
    n = len(shown)
    names = [plot_label(lab) for lab in shown]
    fig, ax = plt.subplots(figsize=(1.6 + 0.5 * n, 1.4 + 0.45 * n) if n > MAX_ANNOTATED else
                           (1.6 + 0.7 * n, 1.4 + 0.6 * n))
    try:
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        if n <= MAX_ANNOTATED:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                            color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=9 if n <= MAX_ANNOTATED else 7)
        ax.set_yticks(range(n), names, fontsize=9 if n <= MAX_ANNOTATED else 7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        if len(shown) < len(labels):
            title = f"{title} ({MAX_SHOWN_LABELS} most frequent of {len(labels):,} labels, the rest as {OTHER})"
        ax.set_title(plot_label(title, limit=120), fontsize=10)
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.png")  # same directory, so the rename is atomic
        try:
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)
    return path
