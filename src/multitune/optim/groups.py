"""AdamW parameter groups: backbone vs new parameters (heads, loss weights), decay vs no decay."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases and normalisation weights are not regularised (standard BERT fine-tuning practice).
    lname = name.lower()
    return param.ndim < 2 or "norm" in lname or lname.endswith("bias")


def build_param_groups(backbone: nn.Module, new_modules: Iterable[tuple[str, nn.Module]], learning_rate: float,
                       head_learning_rate: float, weight_decay: float) -> list[dict]:
    """Four AdamW groups: backbone (decay / no decay) at ``learning_rate`` and new parameters (task heads,
    learned loss weights) at ``head_learning_rate``. Frozen parameters (``requires_grad=False``) are left out.

    Returns:
        Param groups, each with a ``name`` key used by :func:`parameter_table`.
    """
    groups: dict[str, dict] = {}

    def add(group: str, lr: float, decay: float, name: str, param: nn.Parameter) -> None:
        g = groups.setdefault(group, {"name": group, "params": [], "lr": lr, "weight_decay": decay})
        g["params"].append(param)

    for name, p in backbone.named_parameters():
        if p.requires_grad:
            nd = _no_decay(name, p)
            add("backbone" + ("/no_decay" if nd else ""), learning_rate, 0.0 if nd else weight_decay, name, p)
    seen = set()
    for prefix, module in new_modules:
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                nd = _no_decay(name, p)
                add(prefix + ("/no_decay" if nd else ""), head_learning_rate, 0.0 if nd else weight_decay, name, p)
    return list(groups.values())


def parameter_table(groups: list[dict], all_modules: Iterable[nn.Module]) -> list[dict]:
    """Rows ``{group, trainable, lr, weight_decay}`` plus a ``frozen`` row, for the run's parameter table."""
    rows = [{"group": g["name"], "trainable": sum(p.numel() for p in g["params"]), "lr": g["lr"],
             "weight_decay": g["weight_decay"]} for g in groups]
    frozen = sum(p.numel() for m in all_modules for p in m.parameters() if not p.requires_grad)
    rows.append({"group": "frozen", "trainable": 0, "frozen": frozen, "lr": 0.0, "weight_decay": 0.0})
    return rows
