"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning"): a second stage that keeps every task's trained adapter frozen and learns, for a target task,
an attention over their outputs at every adapter site.

At a site whose sub-layer output is ``h`` and whose N adapters give ``z_n = h + adapter_n(h)``:

    s_n = softmax_n( (h Q) . (z_n K) )        o = sum_n s_n (z_n V)

``o`` replaces the single adapter's output. ``Q`` and ``K`` start small and random (so the attention
starts near uniform), ``V`` starts as the identity, so the fused output starts as the mean of the adapter
outputs (the initialisation of the paper's reference implementation). A target task trains its fusion
layers and its head; the adapters and the backbone do not move, so no other task is affected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class AdapterFusionLayer(nn.Module):
    """The fusion attention of one target task at one site.

    Args:
        hidden: the width of the sub-layer output the adapters change.
        device: where the parameters live (the backbone's device).
    """

    def __init__(self, hidden: int, device: torch.device | None = None):
        super().__init__()
        self.query = nn.Linear(hidden, hidden, device=device)
        self.key = nn.Linear(hidden, hidden, device=device)
        self.value = nn.Linear(hidden, hidden, device=device)
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(hidden, device=device))
            self.value.bias.zero_()

    def forward(self, h: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse the adapter outputs.

        Args:
            h: the sub-layer output (the query), ``[batch, tokens, hidden]``.
            outputs: every adapter's output ``z_n``, ``[adapters, batch, tokens, hidden]``.

        Returns:
            The fused output ``[batch, tokens, hidden]`` and the attention ``[batch, tokens, adapters]``.
        """
        dtype = self.query.weight.dtype  # the backbone may run in bf16 while fusion weights stay fp32
        h, outputs = h.to(dtype), outputs.to(dtype)
        q = self.query(h)
        k = self.key(outputs)
        scores = torch.einsum("btd,nbtd->btn", q, k)
        attention = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.einsum("btn,nbtd->btd", attention, self.value(outputs)), attention


def fusion_hook(adapters: Callable[[], list[nn.Module]], delta: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                layers: Callable[[], list[AdapterFusionLayer]], router, fusion_router,
                record: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Callable:
    """A forward hook for one site: rows of fusion targets get the fused output of every adapter, other rows
    their own adapter's output.

    Args:
        adapters: the site's adapters, one per task, in router order.
        delta: ``delta(adapter, h)``: the adapter's change to ``h`` (``z = h + delta``).
        layers: the site's fusion layers, one per target task, in ``fusion_router`` order.
        router: which adapter each row uses (its own task's).
        fusion_router: which fusion layer each row uses; ``-1`` (or ``None``) for rows without fusion.
        record: called with ``(target index, attention, row mask)`` for bookkeeping of the attention.
    """

    def hook(mod, args, h):
        if router.index is None:
            return None
        ads = adapters()
        fidx = fusion_router.index
        if fidx is None or (isinstance(fidx, int) and fidx < 0):  # no fusion in this batch: own adapters only
            if router.per_row:
                deltas = torch.stack([delta(a, h) for a in ads])
                own = deltas[router.index.to(h.device), torch.arange(h.shape[0], device=h.device)]
            else:
                own = delta(ads[router.index], h)
            return h + own.to(h.dtype)
        outputs = torch.stack([h + delta(a, h).to(h.dtype) for a in ads])  # [adapters, batch, tokens, hidden]
        fused_layers = layers()
        if isinstance(fidx, int):
            fused, attention = fused_layers[fidx](h, outputs)
            record(fidx, attention, None)
            return fused.to(h.dtype)
        # a mixed batch: each group of rows through its own fusion layer, or its own adapter
        fidx = fidx.to(h.device)
        out = outputs[router.index.to(h.device), torch.arange(h.shape[0], device=h.device)].clone()
        for j in fidx.unique().tolist():
            if j < 0:
                continue
            rows = fidx == j
            fused, attention = fused_layers[j](h[rows], outputs[:, rows])
            record(j, attention, rows)
            out[rows] = fused.to(out.dtype)
        return out

    return hook
