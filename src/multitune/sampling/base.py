"""The task-sampler extension point: which task the next batch comes from.

Samplers draw from their own seeded ``numpy`` generator (never the global one) and expose their
state, so that a resumed run draws exactly the tasks an uninterrupted run would have drawn.

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
        p = np.array([self.probabilities()[n] for n in self.names])
        return self.names[int(self.rng.choice(len(self.names), p=p / p.sum()))]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
