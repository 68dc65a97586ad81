"""Batch building, in one place: endless, shuffled, resumable batches of one task's cached features.

Every batch of a run is built here, so a different batching policy changes this module only, never the
training loop. Length grouping lives here too: padding is most of the compute of short-text tasks (two
thirds of SST-2's tokens are padding with plain shuffling, batch 32), and grouping rows of similar length
removes nearly all of it while every epoch still visits every example in a seeded random order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from multitune.tasks.base import Task


class TaskBatcher:
    """Shuffled batches of one task, epoch after epoch.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, and the masking generator of
    each batch from (seed, epoch, position), so the stream is fully determined by ``(epoch, position)``:
    that pair is the whole resumable state.

    Oversampling: when ``task.balance_groups(features)`` (asked once, here) returns a group per feature, each
    epoch holds every feature plus ``largest - size`` random repeats of each smaller group, all drawn from the
    same ``seed + e`` generator and shuffled together, so an epoch is ``groups * largest`` long and the
    order is still a pure function of ``(seed, epoch)``.

    Length grouping (``group_by_length``): the epoch's permutation is cut into windows of
    ``GROUP_WINDOW`` batches; each window is ordered by length and cut into batches, and all full batches of
    the epoch are shuffled (the short last batch stays last). Batches hold rows of similar length, so
    dynamic padding adds little, while which examples meet in a batch and the batch order stay random. The
    order is still a pure function of ``(seed, epoch)`` and batches start at multiples of ``batch_size``, so
    ``(epoch, position)`` remains the whole state.

    Label mix: where length goes with the label (paraphrase pairs, short negative phrases), a window sorted
    by length alone makes one-sided batches, and training on them can collapse. So when the task names
    strata (``task.length_strata``: e.g. the class of each example), each stratum of a window is sorted by
    length on its own and the window is ordered by each row's length *quantile within its stratum*: batch k
    takes the k-th length slice of every stratum, so every batch keeps the window's label mix (to within one
    row per stratum) and its rows are still of similar length within each stratum.

    Args:
        task: the task (its ``collate`` pads a batch).
        features: the task's tokenised training examples.
        batch_size: examples per batch; the last batch of an epoch may be smaller.
        pad_token_id: padding id of the tokenizer.
        seed: the task's stream seed.
        group_by_length: build batches of rows of similar length (see above).
        pack: applied to every collated batch (``training.packing``: several examples to a row, see
            :mod:`multitune.backbones.packing`); the examples of a batch are drawn as without it.
    """

    GROUP_WINDOW = 50  # batches per sorted window: larger removes more padding, smaller keeps more randomness

    def __init__(self, task: Task, features: Sequence[dict], batch_size: int, pad_token_id: int, seed: int,
                 group_by_length: bool = False, pack: Callable[[dict], dict] | None = None):
        self.task = task
        self.pack = pack
        self.features = features
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.lengths = np.array([feature_length(f) for f in features], dtype=np.int64) if group_by_length else None
        strata = task.length_strata(features) if group_by_length else None
        if strata is not None and len(strata) != len(features):
            raise ValueError(f"length_strata returned {len(strata)} strata for {len(features)} features")
        self.strata = None if strata is None else np.asarray(strata, dtype=np.int64)
        self.epoch = 0
        self.position = 0
        groups = task.balance_groups(features)
        if groups is not None and len(groups) != len(features):
            raise ValueError(f"balance_groups returned {len(groups)} groups for {len(features)} features")
        self._groups = None if groups is None else self._group_indices(groups)
        self._order = self._permutation(0)

    @staticmethod
    def _group_indices(groups: Sequence[int]) -> list[np.ndarray]:
        by_group: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        return [np.array(by_group[g]) for g in sorted(by_group)]

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed + epoch)
        if not self._groups:  # also with no features at all
            order = rng.permutation(len(self.features))
        else:  # oversampling: every group drawn up to the largest one (all its examples, plus random repeats)
            top = max(len(g) for g in self._groups)
            parts = [np.concatenate([g, rng.choice(g, top - len(g))]) for g in self._groups]
            order = rng.permutation(np.concatenate(parts))
        return order if self.lengths is None else self._grouped(order, rng)

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        window = self.GROUP_WINDOW * self.batch_size
        sorted_windows = [self._window_order(order[i:i + window]) for i in range(0, len(order), window)]
        flat = np.concatenate(sorted_windows) if sorted_windows else order
        full = len(flat) // self.batch_size
        batches = flat[:full * self.batch_size].reshape(full, self.batch_size)[rng.permutation(full)]
        return np.concatenate([batches.reshape(-1), flat[full * self.batch_size:]])

    def _window_order(self, rows: np.ndarray) -> np.ndarray:
        """The rows of one window, longest first; with strata, by length quantile within each stratum (rows at
        the same quantile of different strata interleave, so each batch cut from the result mixes them)."""
        assert self.lengths is not None
        by_length = rows[np.argsort(-self.lengths[rows], kind="stable")]  # stable: ties keep the random order
        if self.strata is None:
            return by_length
        quantile = np.empty(len(by_length))
        strata = self.strata[by_length]
        for s in np.unique(strata):
            at = np.flatnonzero(strata == s)
            quantile[at] = (np.arange(len(at)) + 0.5) / len(at)
        return by_length[np.argsort(quantile, kind="stable")]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        gen_seed = int(np.random.SeedSequence([self.seed, self.epoch, self.position]).generate_state(1)[0])
        self.position += len(idx)
        batch = self.task.collate([self.features[i] for i in idx], self.pad_token_id,
                                  torch.Generator().manual_seed(gen_seed))
        return batch if self.pack is None else self.pack(batch)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / max(len(self._order), 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def feature_length(feature: dict) -> int:
    """Tokens a feature puts into a batch: its input ids (both sides of a bi-encoder pair) and, for
    text-to-text, its target ids."""
    n = sum(len(v) for k, v in feature.items() if k.endswith("input_ids"))
    labels = feature.get("labels")
    return n + (len(labels) if isinstance(labels, (list, tuple)) else 0)


def epoch_tokens(batcher: TaskBatcher, group_by_length: bool) -> tuple[int, int]:
    """``(real tokens, token slots)`` of one epoch of ``batcher``'s task as it would be batched with or without
    length grouping (rows padded to the longest row of their batch; both sides of a pair and text-to-text
    targets count as one row), computed from the lengths alone, so a run can say before its first step what
    grouping saves or costs on its own data."""
    features = batcher.features
    if not features:
        return 0, 0
    order = TaskBatcher(batcher.task, features, batcher.batch_size, 0, batcher.seed, group_by_length)._order
    lengths = np.array([feature_length(features[i]) for i in order], dtype=np.int64)
    real = slots = 0
    for start in range(0, len(lengths), batcher.batch_size):
        chunk = lengths[start:start + batcher.batch_size]
        real += int(chunk.sum())
        slots += int(chunk.max()) * len(chunk)
    return real, slots


def padding_share(batchers: Sequence[TaskBatcher], group_by_length: bool) -> float | None:
    """The share of padding among the token slots of one epoch of every task's training batches (see
    :func:`epoch_tokens`); ``None`` without features."""
    real = slots = 0
    for batcher in batchers:
        r, s = epoch_tokens(batcher, group_by_length)
        real, slots = real + r, slots + s
    return 1.0 - real / slots if slots else None
