"""The task-sampler extension point: which task the next batch comes from.

Samplers draw from their own seeded ``numpy`` generator (never the global one) and expose their
state, so that a resumed run draws exactly the tasks an uninterrupted run would have drawn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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

    def __init__(self, sizes: dict[str, int], config: SamplerConfig, seed: int):
        self.names = list(sizes)
        self.sizes = np.array([sizes[n] for n in self.names], dtype=float)
        self.config = config
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def probabilities(self) -> dict[str, float]:
        """The current share of each task (for logs and plots)."""

    def next_task(self) -> str:
        p = np.array([self.probabilities()[n] for n in self.names])
        return self.names[int(self.rng.choice(len(self.names), p=p / p.sum()))]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
