"""Seeded sampling and held-out splits (stratified where asked); never the global random state."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def sample_examples(examples: Sequence[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded random sample of at most ``n`` examples, in their original order.

    Args:
        examples: the examples to sample from.
        n: the most examples to keep; ``None`` keeps all.
        seed: seed of the sample (a fresh ``numpy`` generator; the global state is not touched).

    Returns:
        A new list: all examples when ``n`` is ``None`` or at least ``len(examples)``, else ``n`` of them.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"cannot sample {n} examples")
    chosen = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in chosen]


def split_examples(examples: Sequence[dict], fractions: dict[str, float], seed: int, stratify_key: str | None
                   ) -> dict[str, list[dict]]:
    """Carve held-out splits, e.g. ``{"validation": 0.1, "test": 0.1}``, out of ``examples``.

    Split ``name`` gets ``round(fraction * len(examples))`` examples, at least one when its fraction is
    positive and enough examples remain (train always keeps at least one); train keeps the rest. With
    ``stratify_key``, and when every class of ``str(example[stratify_key])`` has at least two examples,
    each split gets every class in about its overall proportion (within one example per class);
    otherwise the examples are shuffled. Every split keeps the input order. Deterministic for a seed.

    Args:
        examples: the examples to split (usually the cleaned training data).
        fractions: held-out split name -> fraction of the examples; names with fraction 0 are left out.
        seed: seed of the split (a fresh ``numpy`` generator).
        stratify_key: example field to stratify by (a label), or ``None``.

    Returns:
        ``{"train": [...], name: [...], ...}`` for train and every name with a positive fraction.

    Raises:
        ValueError: a fraction is negative, or the fractions add up to 1 or more.
    """
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise ValueError(f"split fractions must be >= 0 and leave some training data, got {fractions}")
    names = [name for name, f in fractions.items() if f > 0]
    total = len(examples)
    sizes = {name: math.floor(fractions[name] * total + 0.5) for name in names}
    left = total - 1  # train keeps at least one example
    for name in names:  # small data: every requested split first gets one example, in the order given
        sizes[name] = min(max(sizes[name], 1), max(left, 0))
        left -= sizes[name]
    rng = np.random.default_rng(seed)
    order = _stratified_order(examples, stratify_key, rng) if stratify_key else list(rng.permutation(total))
    assigned: dict[str, list[int]] = {}
    start = 0
    for name in names:
        assigned[name] = order[start:start + sizes[name]]
        start += sizes[name]
    assigned = {"train": order[start:], **assigned}
    return {name: [examples[i] for i in sorted(idx)] for name, idx in assigned.items()}


def _stratified_order(examples: Sequence[dict], key: str, rng: np.random.Generator) -> list[int]:
    """A random order of all indices in which every prefix holds each class in about its proportion.

    Each class is shuffled and its members are spread evenly over [0, 1) from a random offset
    (systematic sampling); merging the classes by position makes any prefix a stratified sample.
    Falls back to a plain shuffle when a class has fewer than two examples.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[str(ex.get(key))].append(i)
    if min((len(g) for g in groups.values()), default=0) < 2:
        return list(rng.permutation(len(examples)))
    positions = np.empty(len(examples))
    for label in sorted(groups):  # sorted so the draws do not depend on the order classes first appear
        members = rng.permutation(groups[label])
        positions[members] = (np.arange(len(members)) + rng.random()) / len(members)
    # Ties between classes at the same position are broken at random, not by class order.
    return list(np.lexsort((rng.random(len(examples)), positions)))
