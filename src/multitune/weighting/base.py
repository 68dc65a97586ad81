"""The loss-weighting extension point: how per-task losses become the one loss that is minimised.

A strategy is an ``nn.Module`` (its learnable parameters, if any, are optimised with the heads
and saved in checkpoints) whose ``forward`` returns the combined loss and the weight it gave each
task, so the weights can be logged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from multitune.config.parse import field
from multitune.registry import Registry

WEIGHTINGS: Registry[type[LossWeighting]] = Registry("loss weighting strategy")


@dataclass
class WeightingConfig:
    strategy: str = field("sum", help="loss weighting strategy name")


class LossWeighting(nn.Module, ABC):
    """Combines the losses of the tasks present in a step.

    Args:
        task_names: every task of the run.
        config: the strategy's config.
    """

    config_class: type[WeightingConfig] = WeightingConfig

    def __init__(self, task_names: list[str], config: WeightingConfig):
        super().__init__()
        self.task_names = list(task_names)
        self.config = config

    @abstractmethod
    def forward(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (combined loss, {task: weight used}) for the tasks in ``losses``."""

    def weights(self) -> dict[str, float]:
        """The current weight of every task (for metrics.jsonl)."""
        return {name: 1.0 for name in self.task_names}
