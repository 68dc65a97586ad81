"""The task-sampler extension point: which task the next batch comes from.

Samplers draw from their own seeded ``numpy`` generator (never the global one) and expose their
state, so that a resumed run draws exactly the tasks an uninterrupted run would have drawn.

A strategy only says each task's share (:meth:`TaskSampler.probabilities`); how batches follow the shares is
``sampling.draws``: ``balanced`` (the default) picks the task whose count lags its share the most (a running
credit of ``p`` per batch, one taken for each batch drawn; ties are broken by the seeded generator), so every
task's count stays within one batch of ``t p`` while the shares stay fixed; ``random`` draws every batch's
task independently, so a task's count after ``t`` batches varies by about ``sqrt(t p (1 - p))`` around ``t p``.

A sampler whose shares change during training declares what it needs from the training loop, and the
loop provides it from these declarations, never from the strategy's name:

- ``needs_progress``: :meth:`TaskSampler.set_progress` is called with the step and the run's total steps
  before every optimizer step's draws (e.g. temperature annealing);
- ``needs_evaluations``: :meth:`TaskSampler.observe` is called with every validation evaluation's
  results (e.g. metric-driven re-weighting); a change it returns is logged to ``metrics.jsonl``.

Checks that need the run's task names go in :meth:`TaskSampler.check_config`, which the trainer calls
before anything is read or written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from multitune.config.parse import field
from multitune.registry import Registry

SAMPLERS: Registry[type[TaskSampler]] = Registry("sampling strategy")


@dataclass
class SamplerConfig:
    strategy: str = field("proportional", help="sampling strategy name")
    draws: str = field("balanced", help="balanced: the task whose count lags its share most, so that every "
                                        "task's count stays within one batch of its share; random: each batch's "
                                        "task drawn independently by the shares", choices=["balanced", "random"])


class TaskSampler(ABC):
    """Chooses the task of each batch.

    Args:
        sizes: task name -> number of training examples.
        config: the strategy's config.
        seed: seed of the sampler's own generator.
    """

    config_class: type[SamplerConfig] = SamplerConfig
    #: the training loop calls :meth:`set_progress` before every optimizer step's draws
    needs_progress: bool = False
    #: the training loop calls :meth:`observe` after every validation evaluation
    needs_evaluations: bool = False

    def __init__(self, sizes: dict[str, int], config: SamplerConfig, seed: int):
        self.names = list(sizes)
        self.sizes = np.array([sizes[n] for n in self.names], dtype=float)
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.credit = np.zeros(len(self.names))  # draws: balanced; each task's share so far minus its batches

    @abstractmethod
    def probabilities(self) -> dict[str, float]:
        """The current share of each task (for logs and plots)."""

    @property
    def shares_change(self) -> bool:
        """Whether the shares can change during training (the train lines of metrics.jsonl then log them)."""
        return self.needs_progress or self.needs_evaluations

    @classmethod
    def check_config(cls, config: SamplerConfig, tasks: Sequence[str], path: str = "sampling") -> None:
        """Check the parts of ``config`` that depend on the run's tasks (by default: nothing).

        Raises:
            ConfigError: naming the field path, e.g. ``sampling.reference.foo``.
        """
        return None  # a strategy without such fields has nothing to check

    def set_progress(self, step: int, total_steps: int) -> None:
        """The optimizer steps done so far and the run's ``training.max_steps`` (``needs_progress``)."""
        return None  # only a strategy that declares needs_progress uses it

    def observe(self, step: int, results: dict[str, dict[str, float]], tasks: dict[str, Any]) -> dict | None:
        """A validation evaluation at ``step`` (``needs_evaluations``).

        Args:
            step: the optimizer step of the evaluation.
            results: task -> validation metrics (may hold tasks the sampler does not draw; they are ignored).
            tasks: task name -> :class:`~multitune.tasks.Task` (its ``selection_score`` and ``main_metric``).

        Returns:
            None when the shares stay as they are, else what changed, for a ``{"kind": "sampling"}`` line of
            ``metrics.jsonl``: ``{"shares": {task: share}, "reasons": {task: why}}``.
        """
        return None

    def next_task(self) -> str:
        shares = self.probabilities()
        p = np.array([shares[n] for n in self.names], dtype=float)
        p /= p.sum()
        if self.config.draws == "random":
            return self.names[int(self.rng.choice(len(self.names), p=p))]
        self.credit += p
        lagging = np.flatnonzero(self.credit >= self.credit.max() - 1e-9)
        index = int(lagging[0] if len(lagging) == 1 else self.rng.choice(lagging))
        self.credit[index] -= 1.0
        return self.names[index]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "credit": self.credit.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        if "credit" in state:  # absent from checkpoints written before balanced draws existed
            self.credit = np.array(state["credit"], dtype=float)
