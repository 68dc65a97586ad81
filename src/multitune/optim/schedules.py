"""Learning-rate schedules with linear warmup."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def build_scheduler(optimizer: Optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup over ``warmup_steps``, then ``linear`` decay to 0, ``cosine`` decay to 0 or ``constant``.

    A plain ``LambdaLR`` so its state is a small dict that checkpoints exactly.
    """

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if name == "linear":
            return 1.0 - progress
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return LambdaLR(optimizer, factor)
