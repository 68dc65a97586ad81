"""Batch building, in one place: endless, shuffled, resumable batches of one task's cached features.

Every batch of a run is built here, so a different batching policy (e.g. length-grouped buckets)
changes this module only, never the training loop.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    Args:
        task: the task (its ``collate`` pads a batch).
        features: the task's tokenised training examples.
        batch_size: examples per batch; the last batch of an epoch may be smaller.
        pad_token_id: padding id of the tokenizer.
        seed: the task's stream seed.
    """

    def __init__(self, task: Task, features: Sequence[dict], batch_size: int, pad_token_id: int, seed: int):
        self.task = task
        self.features = features
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
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
            return rng.permutation(len(self.features))
        # oversampling: every group drawn up to the largest one (all its examples, plus random repeats)
        top = max(len(g) for g in self._groups)
        parts = [np.concatenate([g, rng.choice(g, top - len(g))]) for g in self._groups]
        return rng.permutation(np.concatenate(parts))

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        gen_seed = int(np.random.SeedSequence([self.seed, self.epoch, self.position]).generate_state(1)[0])
        self.position += len(idx)
        return self.task.collate([self.features[i] for i in idx], self.pad_token_id,
                                 torch.Generator().manual_seed(gen_seed))

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / max(len(self._order), 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def eval_batches(task: Task, features: Sequence[dict], batch_size: int, pad_token_id: int):
    """Yield ``(indices, batch)`` over all features in length order (less padding); order is restored
    by the caller through the indices. A fixed generator keeps evaluation masks identical across evals."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, task.collate([features[i] for i in idx], pad_token_id,
                                torch.Generator().manual_seed(getattr(task.config, "eval_seed", 0) + start))
