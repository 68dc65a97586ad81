"""Seeded sampling and splitting (stratified where asked); never the global random state."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def sample_examples(examples: Sequence[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded sample of at most ``n`` examples, in their original order."""
    if n is None or n >= len(examples):
        return list(examples)
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in idx]


def split_examples(examples: Sequence[dict], fractions: dict[str, float], seed: int, stratify_key: str | None
                   ) -> dict[str, list[dict]]:
    """Carve held-out splits (e.g. ``{"validation": 0.1, "test": 0.1}``) out of ``examples``.

    Stratified by ``str(example[stratify_key])`` when given (each class split in the same proportions),
    otherwise a seeded shuffle. Every split with a positive fraction gets at least one example when
    there are enough examples; train keeps the rest. Deterministic for a seed.

    Returns:
        ``{"train": [...], name: [...], ...}``.
    """
    names = [n for n, f in fractions.items() if f > 0]
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[str(ex.get(stratify_key)) if stratify_key else ""].append(i)
    if stratify_key and min(len(g) for g in groups.values()) < 2:
        groups = {"": list(range(len(examples)))}  # a singleton class cannot be stratified
    assigned: dict[str, list[int]] = {n: [] for n in ["train", *names]}
    for key in sorted(groups):
        idx = list(rng.permutation(groups[key]))
        for name in names:
            take = int(round(fractions[name] * len(groups[key])))
            assigned[name] += idx[:take]
            idx = idx[take:]
        assigned["train"] += idx
    for name in names:  # small data: make sure every requested split has an example
        if not assigned[name] and len(assigned["train"]) > 1:
            assigned[name].append(assigned["train"].pop())
    return {n: [examples[i] for i in sorted(ix)] for n, ix in assigned.items()}
