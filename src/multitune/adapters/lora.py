"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and DoRA (Liu et al. 2024,
"DoRA: Weight-Decomposed Low-Rank Adaptation") on ``nn.Linear`` layers.

LoRA adds ``(alpha / r) * B A x`` to a frozen layer's output, with ``A`` [r, in] random and ``B`` [out, r]
zero, so training starts from the pretrained function. DoRA splits the adapted weight ``W + sBA`` into a
direction and a learned per-output magnitude ``m``: ``y = m / ||W + sBA|| * (W + sBA) x + b``, with the
norm treated as a constant in the backward pass (section 4.3 of the paper). Both merge into ``W``.
Parameters and on-disk keys follow PEFT's layout (``lora_A.weight``, ``lora_B.weight``,
``lora_magnitude_vector``), so an exported adapter loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from multitune.adapters.base import METHODS, AdapterMethod, MethodConfig, first_matching, linear_sites
from multitune.backbones.quantize import dequantized_weight
from multitune.config.parse import field

DEFAULT_TARGETS = [["query", "value"], ["q_proj", "v_proj"], ["q", "v"]]


class LoraAdapter(nn.Module):
    """One LoRA (or DoRA) adapter on one linear layer: ``lora_A`` [r, in], ``lora_B`` [out, r] and, for
    DoRA, ``magnitude`` [out] (initialised to the row norms of the frozen weight)."""

    def __init__(self, layer: nn.Linear, r: int, dora: bool):
        super().__init__()
        w = dequantized_weight(layer)  # a k-bit layer's (adapters.quantize) as float
        self.lora_A = nn.Parameter(torch.empty(r, layer.in_features, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, device=w.device, dtype=torch.float32))
        if dora:
            self.magnitude = nn.Parameter(w.detach().float().norm(dim=1))


@dataclass
class LoraConfig(MethodConfig):
    """The keys of ``method: lora`` and ``method: dora`` (as PEFT's ``LoraConfig``)."""

    r: int = field(8, help="rank of the update", min=1)
    alpha: float = field(16.0, help="scaling numerator, the update is scaled by alpha/r", gt=0.0)
    dropout: float = field(0.1, help="dropout on the adapter's input", min=0.0, max=0.9)
    target_modules: list[str] | str | None = field(
        None, help="module names (suffixes such as query, value) or one regular expression matched against "
                   "the full module path (default: the attention query/value projections)")


@METHODS.register("lora")
class LoraMethod(AdapterMethod):
    config_class = LoraConfig
    mergeable = True
    peft_type = "LORA"
    dora = False
    # on the seed mixture (300 steps) 3e-3 beat 1e-3 on every task (docs/benchmarks.md); Hu et al. 2021 used
    # 2e-4 to 5e-4 for RoBERTa over far longer runs
    default_learning_rate = 3e-3

    @property
    def scaling(self) -> float:
        return self.options.alpha / self.options.r

    def _targets(self, backbone):
        return self.options.target_modules or first_matching(backbone, DEFAULT_TARGETS)

    def sites(self, backbone):
        return linear_sites(backbone, self._targets(backbone), "adapters.target_modules")

    def new_adapter(self, backbone, path, module):
        return LoraAdapter(module, self.options.r, self.dora)

    def _weight_norm(self, module: nn.Linear, adapter: LoraAdapter) -> torch.Tensor:
        w = dequantized_weight(module).float() + self.scaling * adapter.lora_B @ adapter.lora_A
        return w.norm(dim=1).detach()

    def attach(self, backbone, path, module, adapters, router):
        s, p, dora = self.scaling, self.options.dropout, self.dora

        def hook(mod, args, output):
            if router.index is None:
                return None
            x = F.dropout(args[0], p, training=mod.training) if p else args[0]
            ads = adapters()
            if router.per_row:  # x [batch, tokens, in]; each row through its own A and B
                a = router.select(torch.stack([ad.lora_A for ad in ads]))
                b = router.select(torch.stack([ad.lora_B for ad in ads]))
                delta = torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x.to(a.dtype), a), b) * s
            else:
                ad = ads[router.index]
                delta = F.linear(F.linear(x.to(ad.lora_A.dtype), ad.lora_A), ad.lora_B) * s
            if not dora:
                return output + delta.to(output.dtype)
            bias = mod.bias if mod.bias is not None else 0.0
            if router.per_row:
                scale = router.select(torch.stack([ad.magnitude / self._weight_norm(mod, ad) for ad in ads]))
                scale = scale.unsqueeze(1)  # [batch, 1, out]
            else:
                scale = ads[router.index].magnitude / self._weight_norm(mod, ads[router.index])
            return (scale * (output - bias + delta) + bias).to(output.dtype)

        return [module.register_forward_hook(hook)]

    @torch.no_grad()
    def merge(self, module, adapter):
        w = module.weight.float() + self.scaling * adapter.lora_B @ adapter.lora_A
        if self.dora:
            w = (adapter.magnitude / w.norm(dim=1)).unsqueeze(1) * w
        module.weight.copy_(w.to(module.weight.dtype))

    def peft_export(self, backbone, adapters):
        import peft  # imported only when used: 2 s

        config = peft.LoraConfig(r=self.options.r, lora_alpha=self.options.alpha, lora_dropout=self.options.dropout,
                                 target_modules=sorted(adapters), use_dora=self.dora, bias="none")
        state = {}
        for path, ad in adapters.items():
            state[f"base_model.model.{path}.lora_A.weight"] = ad.lora_A
            state[f"base_model.model.{path}.lora_B.weight"] = ad.lora_B
            if self.dora:
                state[f"base_model.model.{path}.lora_magnitude_vector"] = ad.magnitude
        return config, state


@METHODS.register("dora")
class DoraMethod(LoraMethod):
    dora = True
