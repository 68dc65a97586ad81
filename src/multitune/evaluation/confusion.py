"""Confusion-matrix plot of a classification task (counts annotated, colour normalised per gold row)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def plot_confusion_matrix(labels: Sequence[str], matrix: Sequence[Sequence[int]], path: str | Path,
                          title: str) -> None:
    """Write a PNG: rows are gold labels, columns predicted labels, each cell annotated with its count and
    coloured by its share of the gold row. Written to a temporary file in the same directory, then renamed,
    so ``path`` is always either the old file or the complete new one.

    Args:
        labels: label names in matrix order.
        matrix: counts, ``matrix[gold][predicted]``.
        path: the PNG to write.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    norm = m / np.clip(m.sum(axis=1, keepdims=True), 1, None)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * n, 1.4 + 0.6 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")  # same directory, so the rename is atomic
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
