"""FAMO: fast adaptive multitask optimization (Liu, Liu, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from multitune.config.parse import field
from multitune.weighting.base import WEIGHTINGS, LossWeighting, WeightingConfig


@dataclass
class FAMOConfig(WeightingConfig):
    learning_rate: float = field(0.025, help="learning rate of the task logits (Adam, as in the authors' code)",
                                 gt=0.0)
    gamma: float = field(0.01, help="L2 regularisation of the task logits, which pulls the weights back "
                                    "towards equal", min=0.0)


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LOSS_EPS = 1e-8  # keeps log L and 1 / L finite for a task whose loss reaches 0


@WEIGHTINGS.register("famo")
class FAMOWeighting(LossWeighting):
    """FAMO: weights that make every task's loss fall at a similar rate, at the cost of one loss.

    Task weights z = softmax(xi) come from learned logits xi. The network descends sum_i z_i log L_i
    divided by c = sum_i z_i / L_i (held constant), so task i's gradient gets the weight z_i / (c L_i)
    (these weights sum to 1). After the optimizer step each task's loss is measured again on the same
    batches; with delta_i = log L_i(before) - log L_i(after) the logits take an Adam step (L2
    coefficient ``gamma``) along the gradient of z . delta, which lowers the weight of tasks that
    improved most. Losses are taken as they are (the paper's lower bound is 0). Each step holds one
    batch of every task and costs one extra forward pass without gradients. The logits and the Adam
    moments are buffers, saved with checkpoints. ``loss_weights`` logs z; ``grad_stats`` logs the
    effective weights z_i / (c L_i) as ``effective_weight``.

    Args:
        task_names: every task of the run.
        config: :class:`FAMOConfig`.
    """

    config_class = FAMOConfig
    needs_all_tasks = True
    needs_losses_after_step = True

    def __init__(self, task_names, config: FAMOConfig):
        super().__init__(task_names, config)
        k = len(task_names)
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("adam_m", torch.zeros(k))
        self.register_buffer("adam_v", torch.zeros(k))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.int64))

    def weights(self):
        return {n: float(z) for n, z in zip(self.task_names, torch.softmax(self.logits, dim=0))}

    def forward(self, losses, shared_layer=None):
        names = list(losses)
        index = torch.tensor([self.task_names.index(n) for n in names], device=self.logits.device)
        z = torch.softmax(self.logits[index], dim=0)
        stacked = torch.stack([losses[n].float() for n in names]).clamp_min(0.0) + LOSS_EPS
        c = (z / stacked.detach()).sum()
        effective = z / (c * stacked.detach())
        self.stats = {"effective_weight": {n: round(float(x), 6) for n, x in zip(names, effective)}}
        return (z * stacked.log()).sum() / c, {n: float(x) for n, x in zip(names, effective)}

    def step(self, losses, losses_after=None):
        names = [n for n in losses if losses_after is not None and n in losses_after]
        if not names:
            return
        index = torch.tensor([self.task_names.index(n) for n in names], device=self.logits.device)
        delta = torch.tensor([math.log(max(losses[n], 0.0) + LOSS_EPS) - math.log(max(losses_after[n], 0.0)
                                                                                   + LOSS_EPS) for n in names],
                             device=self.logits.device)
        grad = torch.zeros_like(self.logits)
        z = torch.softmax(self.logits[index], dim=0)
        grad[index] = z * (delta - (z * delta).sum())  # gradient of z . delta w.r.t. the logits
        grad += self.config.gamma * self.logits  # Adam's (coupled) weight decay
        beta1, beta2 = ADAM_BETAS
        self.adam_steps += 1
        t = int(self.adam_steps)
        self.adam_m.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.adam_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.adam_v / (1 - beta2 ** t)).sqrt() + ADAM_EPS
        self.logits -= self.config.learning_rate / (1 - beta1 ** t) * self.adam_m / denom
