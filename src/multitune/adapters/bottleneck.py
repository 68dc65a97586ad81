"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer
et al. 2021, "AdapterFusion"): a small down-projection, a non-linearity and an up-projection added to a
sub-layer's output, ``h + up(act(down(h)))``, before the residual connection and layer norm.

``placement: houlsby`` puts one after the attention output projection and one after the feed-forward
output of every layer; ``pfeiffer`` only the feed-forward one (half the parameters, similar accuracy in
Pfeiffer et al.). The up-projection starts at zero, so training starts from the pretrained function.
Bottleneck adapters are non-linear and do not merge into the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from multitune.adapters.base import METHODS, AdapterMethod, MethodConfig, linear_sites
from multitune.config.parse import field

ATTENTION_OUTPUT = r".*(attention\.output\.dense|self_attn\.o_proj|self_attn\.out_proj|SelfAttention\.o)"
FEEDFORWARD_OUTPUT = r".*(layer\.\d+\.output\.dense|mlp\.down_proj|\.fc2|DenseReluDense\.wo)"
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}


class BottleneckAdapter(nn.Module):
    def __init__(self, layer: nn.Linear, reduction_factor: int):
        super().__init__()
        d = layer.out_features
        m = max(1, d // reduction_factor)
        kw = {"device": layer.weight.device, "dtype": torch.float32}
        self.down = nn.Linear(d, m, **kw)
        self.up = nn.Linear(m, d, **kw)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


def bottleneck_delta(h: torch.Tensor, ads: list[BottleneckAdapter], router, act) -> torch.Tensor:
    """``up(act(down(h)))`` with each row through its routed adapter."""
    if router.per_row:
        dw = router.select(torch.stack([a.down.weight for a in ads]))  # [batch, m, d]
        db = router.select(torch.stack([a.down.bias for a in ads])).unsqueeze(1)
        uw = router.select(torch.stack([a.up.weight for a in ads]))  # [batch, d, m]
        ub = router.select(torch.stack([a.up.bias for a in ads])).unsqueeze(1)
        z = act(torch.einsum("btd,bmd->btm", h.to(dw.dtype), dw) + db)
        return torch.einsum("btm,bdm->btd", z, uw) + ub
    a = ads[router.index]
    return a.up(act(a.down(h.to(a.down.weight.dtype))))


@dataclass
class BottleneckConfig(MethodConfig):
    """The keys of ``method: bottleneck``."""

    reduction_factor: int = field(16, help="hidden size / bottleneck size", min=1)
    placement: str = field("pfeiffer", help="houlsby (after attention and feed-forward) or pfeiffer (after "
                                            "feed-forward only)", choices=["houlsby", "pfeiffer"])
    non_linearity: str = field("relu", help="activation inside the bottleneck", choices=list(ACTIVATIONS))


@METHODS.register("bottleneck")
class BottleneckMethod(AdapterMethod):
    config_class = BottleneckConfig
    fusable = True

    def sites(self, backbone):
        pattern = FEEDFORWARD_OUTPUT if self.options.placement == "pfeiffer" else \
            f"{ATTENTION_OUTPUT}|{FEEDFORWARD_OUTPUT}"
        return linear_sites(backbone, pattern, "adapters.placement")

    def new_adapter(self, backbone, path, module):
        return BottleneckAdapter(module, self.options.reduction_factor)

    def delta(self, adapter, h):
        act = ACTIVATIONS[self.options.non_linearity]
        return adapter.up(act(adapter.down(h.to(adapter.down.weight.dtype))))

    def attach(self, backbone, path, module, adapters, router):
        act = ACTIVATIONS[self.options.non_linearity]

        def hook(mod, args, output):
            if router.index is None:
                return None
            return output + bottleneck_delta(output, adapters(), router, act).to(output.dtype)

        return [module.register_forward_hook(hook)]
