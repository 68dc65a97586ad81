"""The built-in loss weightings: sum, static weights and learned uncertainty weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from multitune.config.parse import field
from multitune.errors import ConfigError
from multitune.weighting.base import WEIGHTINGS, LossWeighting, WeightingConfig


@WEIGHTINGS.register("sum")
class SumWeighting(LossWeighting):
    """Plain sum of the task losses (each weight 1)."""

    def forward(self, losses, shared_layer=None):
        return sum(losses.values()), {name: 1.0 for name in losses}


@dataclass
class StaticConfig(WeightingConfig):
    weights: dict[str, float] = field(help="task name -> fixed loss weight (tasks not named get 1.0)",
                                      factory=dict)


@WEIGHTINGS.register("static")
class StaticWeighting(LossWeighting):
    """Fixed per-task weights from the config."""

    config_class = StaticConfig

    def __init__(self, task_names, config: StaticConfig):
        super().__init__(task_names, config)
        for name, w in config.weights.items():
            if name not in task_names:
                raise ConfigError(f"loss_weighting.weights.{name}", f"no such task; tasks: {', '.join(task_names)}")
            if w < 0:
                raise ConfigError(f"loss_weighting.weights.{name}", f"must be at least 0, got {w}")

    def weights(self):
        return {n: float(self.config.weights.get(n, 1.0)) for n in self.task_names}

    def forward(self, losses, shared_layer=None):
        w = self.weights()
        return sum(w[n] * loss for n, loss in losses.items()), {n: w[n] for n in losses}


@dataclass
class UncertaintyConfig(WeightingConfig):
    learning_rate: float = field(0.05, help="learning rate of the log-variances (AdamW, on the run's schedule): "
                                            "high enough that a weight can reach its balance 1 / loss within the "
                                            "first hundred steps even when the tasks' losses differ 20-fold", gt=0.0)


@WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Each task t has a learned log-variance s_t; the combined loss is
    sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t, so a noisy task is down-weighted while the s_t term
    keeps the weights from collapsing to zero. The logged weight of task t is exp(-s_t), whose balance point is
    1 / L_t: tasks whose losses live on different scales (a mean squared error on a 0-1 scale of about 0.02
    next to a cross-entropy of 0.5) end up contributing alike.

    The log-variances learn at their own ``learning_rate``: AdamW moves a parameter by about its learning rate
    per step, so at a head's 1e-3 a weight could grow only about e^1 over a thousand steps and the strategy
    would stay a plain sum for a whole fine-tuning run.
    """

    config_class = UncertaintyConfig

    def __init__(self, task_names, config):
        super().__init__(task_names, config)
        self.log_vars = nn.Parameter(torch.zeros(len(task_names)))
        self.index = {n: i for i, n in enumerate(task_names)}

    def weights(self):
        return {n: float(torch.exp(-self.log_vars[i]).detach()) for n, i in self.index.items()}

    def forward(self, losses, shared_layer=None):
        total = 0.0
        for name, loss in losses.items():
            s = self.log_vars[self.index[name]]
            total = total + 0.5 * torch.exp(-s) * loss + 0.5 * s
        w = self.weights()
        return total, {n: w[n] for n in losses}

    def parameter_learning_rate(self) -> float | None:
        return self.config.learning_rate
