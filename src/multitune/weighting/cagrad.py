"""CAGrad: conflict-averse gradient descent (Liu et al., "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from multitune.config.parse import field
from multitune.weighting.base import WEIGHTINGS, LossWeighting, WeightingConfig, gradient_stats


@dataclass
class CAGradConfig(WeightingConfig):
    c: float = field(0.4, help="radius of the ball around the mean gradient, relative to its norm: 0 is plain "
                               "gradient descent on the mean loss; larger values favour the worst task more "
                               "(the paper uses 0.4 on NYUv2)", min=0.0, max=1.0)


def cagrad_direction(g: torch.Tensor, c: float) -> tuple[torch.Tensor, np.ndarray]:
    """The CAGrad update for task gradients ``g`` (one row per task) and radius ``c``.

    With g0 the mean gradient and g_w = sum_i w_i g_i, the dual problem
    min over w in the simplex of  g_w . g0 + c |g0| |g_w|  is solved with SLSQP (as the authors do), and
    the update is (g0 + c |g0| / |g_w| g_w) / (1 + c^2) (the authors' rescaling).

    Returns:
        (update, w): the update has the scale of the mean gradient.
    """
    from scipy.optimize import minimize  # here, not at the top: scipy takes a second to import

    k = g.shape[0]
    gram = (g.double() @ g.double().T).cpu().numpy()
    g0_norm = float(np.sqrt(max(gram.mean(), 0.0)) + 1e-8)
    radius = c * g0_norm + 1e-8
    mean_w = np.full(k, 1.0 / k)

    def objective(w: np.ndarray) -> float:
        return float(w @ gram @ mean_w + radius * np.sqrt(max(w @ gram @ w, 0.0) + 1e-8))

    result = minimize(objective, mean_w, bounds=[(0.0, 1.0)] * k,
                      constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum()},), method="SLSQP")
    w = np.clip(result.x, 0.0, 1.0)
    w = w / w.sum()
    g_w = torch.as_tensor(w, dtype=g.dtype, device=g.device) @ g
    update = g.mean(dim=0) + radius / (g_w.norm() + 1e-8) * g_w
    return update / (1.0 + c ** 2), w


@WEIGHTINGS.register("cagrad")
class CAGradWeighting(LossWeighting):
    """Conflict-averse gradient descent: the update that most improves the worst-off task, within a ball
    of radius c |g0| around the mean gradient g0.

    The dual of the paper's problem is a small optimisation over the task simplex (one weight per task;
    solved with scipy's SLSQP on the tasks' Gram matrix, cheap next to the backward passes). The update
    is applied to the shared parameters and has the scale of the *mean* of the task gradients, as in the
    paper (PCGrad and ``sum`` have the scale of their sum; with AdamW the scale matters little).
    Task-specific parameters keep their own task's gradient. Each step holds one batch of every task and
    costs one backward pass per task. Logged: the simplex weights ``w``, gradient norms and cosines.

    Args:
        task_names: every task of the run.
        config: :class:`CAGradConfig`.
    """

    config_class = CAGradConfig
    needs_all_tasks = True
    needs_per_task_gradients = True

    def forward(self, losses, shared_layer=None):
        return sum(losses.values()), {n: 1.0 for n in losses}

    def combine(self, grads):
        names = list(grads)
        update, w = cagrad_direction(torch.stack([grads[n] for n in names]).float(), self.config.c)
        self.stats = {"w": {n: round(float(x), 6) for n, x in zip(names, w)}, **gradient_stats(grads)}
        return update
