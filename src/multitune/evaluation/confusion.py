"""Confusion-matrix plot of a classification task (counts annotated, colour normalised per gold row)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def plot_confusion_matrix(labels: Sequence[str], counts: Sequence[Sequence[int]], path: str | Path,
                          title: str) -> None:
    """Write a PNG: rows are gold labels, columns predicted labels; written to a temporary file, then renamed.

    Args:
        labels: label names in matrix order.
        counts: ``counts[gold][predicted]``.
        path: the PNG to write.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(counts, dtype=float)
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
