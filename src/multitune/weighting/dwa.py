"""Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multitune.config.parse import field
from multitune.weighting.base import WEIGHTINGS, LossWeighting, WeightingConfig


@dataclass
class DWAConfig(WeightingConfig):
    temperature: float = field(2.0, help="T in w_k = K softmax(r_k / T): large T tends to equal weights "
                                         "(the paper uses 2)", gt=0.0)
    period: int = field(50, help="optimizer steps over which each task's loss is averaged; the paper "
                                 "averages over an epoch", min=1)


@WEIGHTINGS.register("dwa")
class DWAWeighting(LossWeighting):
    """Dynamic Weight Average: a task whose loss falls slowly gets more weight.

    With L_k(p) task k's mean loss over period p (``period`` optimizer steps; the paper's epoch) and
    r_k = L_k(p-1) / L_k(p-2), the weights of the next period are w_k = K exp(r_k / T) / sum_i exp(r_i / T)
    for K tasks, and the loss is sum_k w_k L_k. Until a task has two finished periods its ratio is 1, so
    training starts with equal weights, as in the paper. It needs no extra computation and works with a
    sampler that gives each step one task: a period averages whatever batches each task had (a task
    without batches in a period keeps its last average).

    Args:
        task_names: every task of the run.
        config: :class:`DWAConfig`.
    """

    config_class = DWAConfig

    def __init__(self, task_names, config: DWAConfig):
        super().__init__(task_names, config)
        k = len(task_names)
        # the state is in buffers so that it is saved with the checkpoint (exact resume)
        self.register_buffer("loss_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros(k, dtype=torch.int64))
        self.register_buffer("history", torch.full((2, k), float("nan"), dtype=torch.float64))  # p-2, p-1
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def weights(self):
        ratio = (self.history[1] / self.history[0]).nan_to_num(nan=1.0)
        w = len(self.task_names) * torch.softmax(ratio / self.config.temperature, dim=0)
        return {n: float(w[i]) for i, n in enumerate(self.task_names)}

    def forward(self, losses, shared_layer=None):
        w = self.weights()
        ratio = self.history[1] / self.history[0]
        known = {n: round(float(ratio[i]), 6) for i, n in enumerate(self.task_names) if torch.isfinite(ratio[i])}
        self.stats = {"loss_ratio": known} if known else {}
        return sum(w[n] * loss for n, loss in losses.items()), {n: w[n] for n in losses}

    def step(self, losses, losses_after=None):
        for n, value in losses.items():
            i = self.task_names.index(n)
            self.loss_sum[i] += value
            self.loss_count[i] += 1
        self.steps += 1
        if int(self.steps) % self.config.period == 0:
            seen = self.loss_count > 0
            self.history[0, seen] = self.history[1, seen]
            self.history[1, seen] = self.loss_sum[seen] / self.loss_count[seen]
            self.loss_sum.zero_()
            self.loss_count.zero_()
