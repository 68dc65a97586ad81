"""PCGrad: projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020)."""

from __future__ import annotations

import torch

from multitune.weighting.base import WEIGHTINGS, LossWeighting, gradient_stats


@WEIGHTINGS.register("pcgrad")
class PCGradWeighting(LossWeighting):
    """Gradient surgery: where two tasks' gradients conflict, each loses its component along the other.

    For each task i, in turn, and each other task j in a random order: if g_i . g_j < 0, then
    g_i <- g_i - (g_i . g_j / |g_j|^2) g_j (projected onto the normal plane of the original g_j). The
    update is the sum of the projected gradients, on the shared parameters; task-specific parameters
    keep their own task's gradient. Each step holds one batch of every task and costs one backward pass
    per task. The random orders come from a generator seeded with the number of combined steps, so a
    resumed run projects in the same orders. Logged: ``conflicts`` (projections made), gradient norms and
    pairwise cosines before surgery.

    Args:
        task_names: every task of the run.
        config: the base :class:`~multitune.weighting.base.WeightingConfig` (no options).
    """

    needs_all_tasks = True
    needs_per_task_gradients = True

    def __init__(self, task_names, config):
        super().__init__(task_names, config)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, losses, shared_layer=None):
        return sum(losses.values()), {n: 1.0 for n in losses}

    def combine(self, grads):
        names = list(grads)
        g = torch.stack([grads[n] for n in names]).float()
        squared = (g * g).sum(dim=1)
        generator = torch.Generator().manual_seed(int(self.calls))
        projected = g.clone()
        conflicts = 0
        for i in range(len(names)):
            for j in torch.randperm(len(names), generator=generator).tolist():
                if j == i or squared[j] == 0:
                    continue
                dot = projected[i] @ g[j]
                if dot < 0:
                    projected[i] -= dot / squared[j] * g[j]
                    conflicts += 1
        self.calls += 1
        self.stats = {"conflicts": conflicts, **gradient_stats(grads)}
        return projected.sum(dim=0)
