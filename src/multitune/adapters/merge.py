"""Merging several LoRA adapters of the same sites into one, through PEFT's ``add_weighted_adapter``.

The adapters are given as tensors (``lora_A`` [r, in], ``lora_B`` [out, r] per site, with their scaling
``alpha / r``); they are put on a skeleton that holds only the adapted linear layers at their paths, PEFT
combines them, and the merged factors come back with scaling 1 (PEFT's merged adapter has ``lora_alpha = r``).

Methods (``MERGE_METHODS``; each update is ``delta W_i = s_i B_i A_i`` with ``s_i = alpha_i / r_i``):

- ``linear``: ``delta W = sum_i w_i delta W_i``, exactly (PEFT's ``cat``: the factors side by side, rank
  ``sum r_i``).
- ``ties`` (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"): each update keeps
  its largest-magnitude ``density`` share of entries, every entry takes the sign with the larger total mass,
  and the entries of that sign are averaged (weighted by ``w_i``).
- ``dare`` (Yu et al. 2024, "Language Models are Super Mario"): each update keeps a random ``density`` share of
  its entries, rescaled by ``1 / density``; then the weighted sum.
- ``dare_ties``: DARE's random drop, then TIES's sign election and average.

``ties``, ``dare`` and ``dare_ties`` act on the updates ``delta W_i`` (PEFT's ``*_svd`` variants), not on the
factors: adapters trained apart start from different random ``A``, so combining ``A``s and ``B``s separately
would multiply one task's ``B`` with another's ``A``. The merged update is brought back to a LoRA of rank
``sum r_i`` (at most the layer's smaller side) by a truncated SVD.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from multitune.errors import MultituneError

#: merge method -> PEFT ``combination_type``
PEFT_COMBINATIONS = {"linear": "cat", "ties": "ties_svd", "dare": "dare_linear_svd", "dare_ties": "dare_ties_svd"}
MERGE_METHODS = list(PEFT_COMBINATIONS)
#: methods that prune each update to a ``density`` share of its entries
PRUNING_METHODS = ("ties", "dare", "dare_ties")

LoraFactors = tuple[torch.Tensor, torch.Tensor]  # (lora_A [r, in], lora_B [out, r])


def _skeleton(shapes: Mapping[str, tuple[int, int]]) -> nn.Module:
    """A module tree with an ``nn.Linear(in, out)`` at each path, weights zero (PEFT reads only their shapes)."""
    root = nn.Module()
    for path, (in_features, out_features) in shapes.items():
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(leaf, nn.Linear(in_features, out_features, bias=False, device="meta"))
    root.to_empty(device="cpu")
    for weight in root.parameters():
        nn.init.zeros_(weight)
    return root


def merge_lora(adapters: Sequence[Mapping[str, LoraFactors]], scalings: Sequence[float], weights: Sequence[float],
               method: str, density: float = 0.5, seed: int = 0) -> tuple[dict[str, LoraFactors], int]:
    """Merge LoRA adapters of the same sites into one adapter (see the module docstring).

    Args:
        adapters: per adapter, ``{site path: (lora_A, lora_B)}``; every adapter has the same sites and shapes.
        scalings: per adapter, its ``alpha / r``.
        weights: per adapter, its weight ``w_i`` in the merge.
        method: one of :data:`MERGE_METHODS`.
        density: ``ties`` / ``dare`` / ``dare_ties``: the share of each update's entries kept, in (0, 1].
        seed: seed of DARE's random drop (the global random state is left as it was).

    Returns:
        ``({site path: (lora_A, lora_B)}, rank)``: the merged factors (float32, on the CPU), to be applied with
        scaling 1 (``alpha = rank``).

    Raises:
        MultituneError: an unknown method, fewer than two adapters, lengths that differ, adapters on other sites
            or shapes, or a density outside (0, 1].
    """
    import peft  # imported only when used: 2 s
    from peft.tuners.lora import LoraModel

    if method not in PEFT_COMBINATIONS:
        raise MultituneError(f"merge method: expected one of {', '.join(MERGE_METHODS)}, got {method!r}")
    if len(adapters) < 2:
        raise MultituneError(f"merge: needs at least two adapters, got {len(adapters)}")
    if not len(adapters) == len(scalings) == len(weights):
        raise MultituneError(f"merge: {len(adapters)} adapters, {len(scalings)} scalings and {len(weights)} weights; "
                             f"give one of each per adapter")
    if method in PRUNING_METHODS and not 0.0 < density <= 1.0:
        raise MultituneError(f"merge density: expected a share in (0, 1], got {density}")
    sites = list(adapters[0])
    shapes = {p: (int(a.shape[1]), int(b.shape[0])) for p, (a, b) in adapters[0].items()}
    ranks = [int(next(iter(ad.values()))[0].shape[0]) for ad in adapters]
    for i, ad in enumerate(adapters):
        if list(ad) != sites or any((a.shape[1], b.shape[0], a.shape[0], b.shape[1]) != (*shapes[p], ranks[i], ranks[i])
                                    for p, (a, b) in ad.items()):
            raise MultituneError(f"merge: adapter {i} sits on other layers or has other shapes than adapter 0")
    names = [f"adapter_{i}" for i in range(len(adapters))]
    configs = {name: peft.LoraConfig(r=r, lora_alpha=s * r, target_modules=sorted(sites), lora_dropout=0.0,
                                     bias="none")
               for name, r, s in zip(names, ranks, scalings)}
    lora = LoraModel(_skeleton(shapes), configs, names[0])
    for name in names[1:]:
        lora.inject_adapter(lora.model, name)
    with torch.no_grad():
        for name, ad in zip(names, adapters):
            for path, (a, b) in ad.items():
                layer = lora.model.get_submodule(path)
                layer.lora_A[name].weight.copy_(a.detach().float().cpu())
                layer.lora_B[name].weight.copy_(b.detach().float().cpu())
    combination = PEFT_COMBINATIONS[method]
    # an SVD keeps at most min(out, in) directions of an update
    rank = sum(ranks) if combination == "cat" else min(sum(ranks), *(min(s) for s in shapes.values()))
    options = {} if combination == "cat" else {"svd_rank": rank, "density": density}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning")  # density 1: nothing dropped
        torch.manual_seed(seed)
        lora.add_weighted_adapter(names, [float(w) for w in weights], "merged", combination_type=combination,
                                  **options)
    merged = {}
    for path in sites:
        layer = lora.model.get_submodule(path)
        merged[path] = (layer.lora_A["merged"].weight.detach().float().clone(),
                        layer.lora_B["merged"].weight.detach().float().clone())
    return merged, rank
