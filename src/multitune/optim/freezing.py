"""Which parameters train: permanent freezing (feature extraction, embeddings, a layer range, task heads)
and gradual unfreezing from the top (Howard & Ruder 2018, ULMFiT)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from multitune.errors import ConfigError
from multitune.optim.layers import EMBEDDINGS, parameter_depths, unfreeze_order

if TYPE_CHECKING:
    from multitune.config.schema import FreezeConfig, GradualUnfreezingConfig


def apply_freezing(backbone: nn.Module, heads: nn.ModuleDict, config: FreezeConfig) -> int:
    """Set ``requires_grad=False`` on what ``config`` freezes; returns the number of frozen parameters.

    Raises:
        ConfigError: ``freeze.layers`` reaches past the backbone's last layer.
    """
    named = list(backbone.named_parameters())
    depths, num_layers = parameter_depths(named)
    if config.layers is not None and config.layers[1] >= num_layers:
        raise ConfigError("freeze.layers", f"the backbone has {num_layers} layers (0..{num_layers - 1}), "
                                           f"got {config.layers}")
    frozen = 0
    words = backbone.get_input_embeddings().weight if config.word_embeddings else None
    for name, p in named:
        d = depths[name]
        if (config.backbone or (config.embeddings and d == EMBEDDINGS) or p is words
                or (config.layers is not None and config.layers[0] + 1 <= d <= config.layers[1] + 1)):
            p.requires_grad_(False)
            frozen += p.numel()
    for task in config.heads or []:
        for p in heads[task].parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


class GradualUnfreezer:
    """Start with every (not permanently frozen) backbone parameter frozen and release one layer group from
    the top every ``every`` steps: the top layer first, the embeddings last, up to ``depth`` groups.

    The state is a pure function of the step, so a resumed run unfreezes exactly as an uninterrupted one.
    Build it after the optimizer's param groups, which must already hold the parameters it will release.

    Args:
        backbone: the shared backbone.
        config: ``training.gradual_unfreezing``.
        steps_per_epoch: optimizer steps in one pass over all training data (for ``unit: epochs``).
    """

    def __init__(self, backbone: nn.Module, config: GradualUnfreezingConfig, steps_per_epoch: int):
        named = [(n, p) for n, p in backbone.named_parameters()]
        depths, num_layers = parameter_depths(named)
        order = unfreeze_order(num_layers)
        self.groups: list[list[nn.Parameter]] = [
            [p for n, p in named if depths[n] in group and p.requires_grad] for group in order[: config.depth]]
        self.every = config.every * (max(steps_per_epoch, 1) if config.unit == "epochs" else 1)
        self.open = -1
        for _, p in named:
            p.requires_grad_(False)
        self.update(0)

    def unfreeze_steps(self) -> dict[int, int]:
        """``id(param) -> step`` at which each parameter starts training."""
        return {id(p): (i + 1) * self.every for i, group in enumerate(self.groups) for p in group}

    def update(self, step: int) -> int | None:
        """Release the groups due at ``step`` (steps done so far); returns how many are open when that
        changed, else None."""
        due = min(len(self.groups), step // self.every)
        if due == self.open:
            return None
        for i, group in enumerate(self.groups):
            for p in group:
                p.requires_grad_(i < due)
        self.open = due
        return due
