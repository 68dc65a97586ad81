"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale the keys, the values and the inner feed-forward activations.

A target's output is multiplied by its vector; a feed-forward target's *input* is (so the vector scales
the activation between the two feed-forward layers). Vectors start at one (the pretrained function) and
merge into the weights. Shapes and keys follow PEFT (``ia3_l`` [out, 1], or [1, in] for feed-forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from multitune.adapters.base import METHODS, AdapterMethod, MethodConfig, linear_sites, matches
from multitune.config.parse import field

# (targets, feed-forward targets) per family layout: BERT, LLaMA/Qwen, T5, BART
DEFAULTS = [
    (r".*\.(key|value)|.*layer\.\d+\.output\.dense", r".*layer\.\d+\.output\.dense"),
    (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    (["k", "v", "wo"], ["wo"]),
    (["k_proj", "v_proj", "fc2"], ["fc2"]),
]


class IA3Adapter(nn.Module):
    def __init__(self, layer: nn.Linear, feedforward: bool):
        super().__init__()
        shape = (1, layer.in_features) if feedforward else (layer.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(*shape, device=layer.weight.device, dtype=torch.float32))
        self.feedforward = feedforward


@dataclass
class IA3Config(MethodConfig):
    """The keys of ``method: ia3`` (as PEFT's ``IA3Config``)."""

    target_modules: list[str] | str | None = field(
        None, help="module names (suffixes such as key, value) or one regular expression matched against the "
                   "full module path (default: key, value and the feed-forward output)")
    feedforward_modules: list[str] | str | None = field(
        None, help="targets whose input (not output) is scaled: the feed-forward output layers")


@METHODS.register("ia3")
class IA3Method(AdapterMethod):
    config_class = IA3Config
    mergeable = True
    peft_type = "IA3"
    default_learning_rate = 3e-3  # Liu et al. 2022 (T-Few) train the IA3 vectors at 3e-3

    def __init__(self, config, backbone, architecture):
        super().__init__(config, backbone, architecture)
        self._resolved = self._find_targets(backbone)  # scan the backbone once, not once per site

    def _targets(self, backbone):
        return self._resolved

    def _find_targets(self, backbone):
        if self.options.target_modules is not None:
            return self.options.target_modules, self.options.feedforward_modules or []
        for targets, ff in DEFAULTS:
            if any(isinstance(m, nn.Linear) and p and matches(p, targets) for p, m in backbone.named_modules()):
                return targets, ff
        return DEFAULTS[0]

    def sites(self, backbone):
        return linear_sites(backbone, self._targets(backbone)[0], "adapters.target_modules")

    def new_adapter(self, backbone, path, module):
        ff = self._targets(backbone)[1]
        return IA3Adapter(module, bool(ff) and matches(path, ff))

    def attach(self, backbone, path, module, adapters, router):
        def vectors():
            ads = adapters()
            if router.per_row:  # [batch, 1, dim]
                return router.select(torch.stack([ad.ia3_l.reshape(-1) for ad in ads])).unsqueeze(1)
            return ads[router.index].ia3_l.reshape(-1)

        ff = self._targets(backbone)[1]
        if ff and matches(path, ff):
            def pre_hook(mod, args):
                if router.index is None:
                    return None
                return (args[0] * vectors().to(args[0].dtype), *args[1:])

            return [module.register_forward_pre_hook(pre_hook)]

        def hook(mod, args, output):
            if router.index is None:
                return None
            return output * vectors().to(output.dtype)

        return [module.register_forward_hook(hook)]

    @torch.no_grad()
    def merge(self, module, adapter):
        scale = adapter.ia3_l.to(module.weight.dtype)
        module.weight.mul_(scale)  # [out, 1] scales rows, [1, in] columns
        if not adapter.feedforward and module.bias is not None:
            module.bias.mul_(scale.reshape(-1))

    def peft_export(self, backbone, adapters):
        import peft  # imported only when used: 2 s

        ff = sorted(p for p, ad in adapters.items() if ad.feedforward)
        config = peft.IA3Config(target_modules=sorted(adapters), feedforward_modules=ff)
        return config, {f"base_model.model.{p}.ia3_l": ad.ia3_l for p, ad in adapters.items()}
