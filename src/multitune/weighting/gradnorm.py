"""GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
Networks", ICML 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from multitune.config.parse import field
from multitune.weighting.base import WEIGHTINGS, LossWeighting, WeightingConfig


@dataclass
class GradNormConfig(WeightingConfig):
    alpha: float = field(1.5, help="asymmetry: how strongly a task that trains slower than the others is "
                                   "pulled back (0 equalises gradient norms only; the paper uses 0.12 to 3, "
                                   "1.5 on NYUv2)", min=0.0)


@WEIGHTINGS.register("gradnorm")
class GradNormWeighting(LossWeighting):
    """GradNorm: learned task weights w_i that balance the tasks' gradient norms on the last shared layer.

    With W the weight of the last shared layer, G_i = |grad_W (w_i L_i)| = w_i |grad_W L_i|, its mean Gbar,
    the training rate r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)) and asymmetry alpha, the weights descend
    L_grad = sum_i |G_i - Gbar r_i^alpha|, the target Gbar r_i^alpha held constant, while the network
    descends sum_i w_i L_i with the w_i held constant. After each optimizer step the weights are
    renormalised to sum to the number of tasks. As in the paper the weights train with the network's
    optimizer (AdamW, at ``training.head_learning_rate``, no weight decay): :meth:`forward` returns a loss
    whose value is sum_i w_i L_i and whose gradient w.r.t. w is grad_w L_grad. L_i(0) is each task's first
    loss. Each step holds one batch of every task; the extra cost is one backward pass per task through
    the head only, down to W. Logged: each task's ``grad_norm`` |grad_W L_i| and ``training_rate`` r_i.

    Args:
        task_names: every task of the run.
        config: :class:`GradNormConfig`.
    """

    config_class = GradNormConfig
    needs_all_tasks = True
    needs_shared_layer = True

    def __init__(self, task_names, config: GradNormConfig):
        super().__init__(task_names, config)
        self.task_weights = nn.Parameter(torch.ones(len(task_names)))
        self.register_buffer("initial_losses", torch.full((len(task_names),), float("nan")))

    def weights(self):
        return {n: float(w) for n, w in zip(self.task_names, self.task_weights.detach())}

    def forward(self, losses, shared_layer=None):
        names = list(losses)
        index = torch.tensor([self.task_names.index(n) for n in names], device=self.task_weights.device)
        w = self.task_weights[index]
        stacked = torch.stack([losses[n].float() for n in names])
        total = (w.detach() * stacked).sum()
        if shared_layer is None:  # nothing to balance on: the weights stay as they are
            return total, {n: float(x) for n, x in zip(names, w.detach())}
        with torch.no_grad():
            first = self.initial_losses[index]
            unset = torch.isnan(first) & torch.isfinite(stacked)
            self.initial_losses[index[unset]] = stacked[unset].detach()
        norms = torch.stack([torch.autograd.grad(loss, shared_layer, retain_graph=True)[0].float().norm()
                             for loss in stacked.unbind()])
        with torch.no_grad():
            ratio = stacked / self.initial_losses[index].clamp_min(1e-12)
            rate = ratio / ratio.mean()
            g = w * norms
            target = g.mean() * rate ** self.config.alpha
            # d L_grad / d w_i = sign(w_i |grad L_i| - target_i) |grad L_i|
            grad_w = torch.sign(g - target) * norms
        surrogate = ((w - w.detach()) * grad_w).sum()  # value 0, gradient grad_w
        self.stats = {"grad_norm": {n: round(float(x), 6) for n, x in zip(names, norms)},
                      "training_rate": {n: round(float(x), 6) for n, x in zip(names, rate)},
                      "gradnorm_loss": round(float((g - target).abs().sum()), 6)}
        return total + surrogate, {n: float(x) for n, x in zip(names, w.detach())}

    def step(self, losses, losses_after=None):
        with torch.no_grad():  # the paper's renormalisation: the weights sum to the number of tasks
            w = self.task_weights.clamp_min(1e-4)
            self.task_weights.copy_(w * len(self.task_names) / w.sum())
