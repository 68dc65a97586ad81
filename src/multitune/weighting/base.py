"""The loss-weighting extension point: how the tasks of a step become the one update that is made.

A strategy is an ``nn.Module``. Loss-level strategies (sum, static, uncertainty, DWA, GradNorm, FAMO)
turn the task losses into one loss in :meth:`LossWeighting.forward`; gradient-level strategies (PCGrad,
CAGrad) also turn the per-task gradients of the shared parameters into one gradient in
:meth:`LossWeighting.combine`. Learnable parameters of a strategy are optimised with the heads; its other
state lives in persistent buffers. Both travel in checkpoints, so a resumed run continues exactly.

What a strategy needs from the training loop it declares as class attributes, which the loop honours
(:mod:`multitune.training.multistep`); the loop never asks for a strategy's name:

- ``needs_all_tasks``: every step holds one batch of every task (in the run's task order) instead of
  the one task the sampler draws.
- ``needs_per_task_gradients``: the loop back-propagates each task's loss on its own, hands the gradients
  of the shared trainable parameters (one flat fp32 vector per task) to :meth:`combine`, and writes the
  result back as their gradient; task-specific parameters (heads, per-task adapters) keep their own
  task's gradient.
- ``needs_shared_layer``: :meth:`forward` gets ``shared_layer``, the weight of the last shared layer
  that every task's loss reaches.
- ``needs_losses_after_step``: :meth:`step` also gets each task's loss on the same batches after the
  optimizer step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from multitune.config.parse import field
from multitune.registry import Registry

WEIGHTINGS: Registry[type[LossWeighting]] = Registry("loss weighting strategy")


@dataclass
class WeightingConfig:
    strategy: str = field("sum", help="loss weighting strategy name")


class LossWeighting(nn.Module, ABC):
    """Combines the losses (and, for gradient-level strategies, the gradients) of the tasks of a step.

    Args:
        task_names: every task of the run.
        config: the strategy's config.

    Attributes:
        stats: what the strategy used in its last step besides the weights (plain numbers, e.g. gradient
            cosines, projected conflicts); the loop writes it into ``metrics.jsonl`` as ``grad_stats``.
    """

    config_class: type[WeightingConfig] = WeightingConfig
    needs_all_tasks: bool = False
    needs_per_task_gradients: bool = False
    needs_shared_layer: bool = False
    needs_losses_after_step: bool = False

    def __init__(self, task_names: list[str], config: WeightingConfig):
        super().__init__()
        self.task_names = list(task_names)
        self.config = config
        self.stats: dict[str, Any] = {}

    def parameter_learning_rate(self) -> float | None:
        """The learning rate of the strategy's own parameters (if it has any), or None for the heads' rate."""
        return None

    @abstractmethod
    def forward(self, losses: dict[str, torch.Tensor], shared_layer: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (combined loss, {task: weight used}) for the tasks in ``losses``.

        Args:
            losses: task -> scalar loss of the step (with its graph).
            shared_layer: the last shared weight every loss reaches; given only when ``needs_shared_layer``.
        """

    def weights(self) -> dict[str, float]:
        """The current weight of every task (for metrics.jsonl)."""
        return {name: 1.0 for name in self.task_names}

    def combine(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Turn per-task gradients of the shared parameters into the one gradient to descend along, and
        leave what was done in :attr:`stats`.

        Called only when ``needs_per_task_gradients``; this default adds them up (what back-propagating
        the sum of the losses gives).

        Args:
            grads: task -> flat fp32 gradient of that task's (weighted) loss w.r.t. the shared parameters,
                in the run's task order.

        Returns:
            The combined flat gradient.
        """
        return torch.stack(list(grads.values())).sum(0)

    def step(self, losses: dict[str, float], losses_after: dict[str, float] | None = None) -> None:
        """Update the strategy's state after an optimizer step (default: nothing to update).

        Args:
            losses: task -> mean loss of the step's batches of that task (averaged over processes).
            losses_after: the same batches' losses after the update; given only when
                ``needs_losses_after_step``.
        """


def gradient_stats(grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Norms of the task gradients and their pairwise cosine similarities (``"a|b"`` keys), for logs.

    A negative cosine is a conflict: descending one task's gradient ascends the other's loss.
    """
    names = list(grads)
    g = torch.stack([grads[n] for n in names]).double()
    norms = g.norm(dim=1)
    cos = (g @ g.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    return {"grad_norm": {n: round(float(v), 6) for n, v in zip(names, norms)},
            "cosine": {f"{a}|{b}": round(float(cos[i, j]), 6)
                       for i, a in enumerate(names) for j, b in enumerate(names) if i < j}}
