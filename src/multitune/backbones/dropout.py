"""Dropout whose random mask costs a third on a CPU.

PyTorch's CPU dropout draws one 32-bit random number per element (``bernoulli_``), and on fine-tuning shapes
that draw is most of the cost: the training-step profile of the seed mixture (docs/benchmarks.md) puts dropout
at about an eighth of a step, more than the optimizer, gradient clipping and layer norm together.
:class:`PackedMaskDropout` draws 64 random bits and reads them as four 16-bit numbers, one per element, so one
draw decides four elements. An element is dropped when its 16-bit number falls below ``round(p * 65536)``:
the drop probability is ``p`` rounded to a multiple of 1/65536 (0.1 becomes 0.100006), and kept elements are
scaled by the inverse of the exact keep probability, so the expected output equals the input. The draws come
from the default CPU generator, so ``torch.manual_seed`` and checkpointed RNG state make them repeat.

On other devices, and in evaluation, the module is an ordinary :class:`torch.nn.Dropout`. It holds no weights,
so a saved model is the same with either module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_LEVELS = 1 << 16


def packed_keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask of ``shape`` with drop probability ``p`` (rounded to 1/65536) and the scale of kept
    elements.

    Args:
        shape: the mask's shape.
        p: drop probability, in [0, 1).

    Returns:
        (mask, scale): ``mask`` True where the element is kept; ``scale`` = 1 / keep probability.
    """
    n = 1
    for d in shape:
        n *= int(d)
    # randint over the whole signed range gives 64 uniform bits (random_() alone leaves the top bit at 0)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
    drop_levels = round(p * _LEVELS)
    keep = words.view(torch.int16)[:n].view(shape) >= drop_levels - (1 << 15)
    return keep, _LEVELS / (_LEVELS - drop_levels)


class _ScaleByMask(torch.autograd.Function):
    """``x * mask * scale`` that keeps only the boolean mask for the backward pass, as native dropout does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


class PackedMaskDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` that, in training on a CPU, draws its mask with :func:`packed_keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu" or x.numel() == 0:
            return F.dropout(x, self.p, self.training, self.inplace)
        keep, scale = packed_keep_mask(x.shape, self.p)
        return _ScaleByMask.apply(x, keep, scale)


def use_packed_mask_dropout(module: nn.Module) -> int:
    """Turn every plain :class:`torch.nn.Dropout` under ``module`` into a :class:`PackedMaskDropout` (same ``p``,
    in place; subclasses and other dropout kinds are left alone).

    Returns:
        How many modules were changed.
    """
    changed = 0
    for sub in module.modules():
        if type(sub) is nn.Dropout and sub.p > 0.0:
            sub.__class__ = PackedMaskDropout  # no state beyond p and inplace: the class is all that differs
            changed += 1
    return changed
