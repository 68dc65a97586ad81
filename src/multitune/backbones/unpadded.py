"""Unpadded execution of BERT-layout encoders (``training.unpadded``): compute spent on real tokens only.

A padded batch ``[batch, width]`` runs every token-wise part of a transformer layer (embeddings, the query, key,
value and output projections, the feed-forward block, the layer norms) on padding too: a quarter to two thirds
of the work on batches that are not grouped by length. Here those parts run on the real tokens only, packed
into one row ``[1, real tokens, hidden]``. Attention, the only part that mixes tokens, scatters the packed
queries, keys and values into padded ``[rows, heads, width, head_dim]`` tensors, runs each row's attention with
its padding mask (the kernels the padded path runs: eager matmuls and softmax, or
``scaled_dot_product_attention``) and gathers the output back to the packed row. The rows are sorted by length
and cut into buckets of similar length, each padded to its own longest row, where that saves more attention
work (and attention dropout) than the extra kernel calls cost. Heads get the usual ``[batch, width, hidden]``
states, with zeros at padded positions (heads only read real ones).

The result is the padded path's at every real position (the same function; float rounding aside), for any
padding side, because each token keeps the position id the padded path gives it. The path calls the
backbone's own submodules (``embeddings``, ``attention.self.query``, ``attention.output``, ``intermediate``,
``output``...), so adapters that wrap or hook those modules (LoRA, DoRA, IA3, bottleneck adapters,
AdapterFusion, task embeddings) and dropout act as on the padded path. It does not call the token model,
its encoder, its layers or their attention modules as a whole: :func:`unpadded_support` refuses a backbone
where anything hooks those (prompt and prefix tuning, FSDP), and any family whose modules are not BERT's.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

#: ``config.model_type`` of the families whose layers are BERT's, line for line (transformers 5: their
#: attention, layer and encoder modules are generated from BERT's); their embeddings differ only in how
#: position ids are made, which :func:`_padded_position_ids` reproduces
FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "data2vec-text", "electra")

#: the decision of each token model, made at its first unpadded call (see :func:`runs_unpadded`)
_DECIDED: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def _token_model(model: Any) -> nn.Module:
    if hasattr(model, "architecture") and hasattr(model, "backbone"):  # a MultiTaskModel
        return model.architecture.token_model(model.backbone)
    return model


def _bypassed(token_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose own forward the unpadded path replaces (it calls their children instead)."""
    out = [("the token model", token_model), ("encoder", token_model.encoder)]
    for i, layer in enumerate(token_model.encoder.layer):
        out += [(f"encoder.layer.{i}", layer), (f"encoder.layer.{i}.attention", layer.attention),
                (f"encoder.layer.{i}.attention.self", layer.attention.self)]
    return out


def _hook_reason(path: str, module: nn.Module) -> str | None:
    kinds = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
             ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
    for attr, kind in kinds:
        hooks = getattr(module, attr, None)
        if hooks:
            name = getattr(next(iter(hooks.values())), "__qualname__", "a hook")
            return (f"{path} has a {kind} ({name}) that the unpadded path would skip: it runs the modules inside "
                    f"it, not {path} as a whole (prompt and prefix tuning change the token model's inputs and "
                    f"attention; FSDP gathers weights there)")
    if getattr(module, "_compiled_call_impl", None) is not None:
        return f"{path} is compiled (torch.compile), and the unpadded path does not call it"
    return None


def unpadded_support(model: Any) -> str | None:
    """Why ``model`` cannot run unpadded with the same results as padded, or None when it can.

    Args:
        model: a :class:`multitune.model.MultiTaskModel`, or the token model of a backbone (a ``BertModel``...).

    Returns:
        None, or one sentence: the family is not BERT-layout (decoders, T5, DeBERTa...), the backbone is
        configured as a decoder or with relative positions, or a module the path does not call as a whole is
        hooked (prompt tuning, prefix tuning, FSDP) or compiled. Gradient checkpointing is honoured: the
        path checkpoints each layer it runs whose ``gradient_checkpointing`` flag is set.
    """
    token_model = _token_model(model)
    config = getattr(token_model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return (f"the backbone family {family or type(token_model).__name__!r} does not have BERT's module layout "
                f"(unpadded execution supports {', '.join(FAMILIES)})")
    package = type(token_model).__module__
    if not package.startswith("transformers.models."):
        return f"{type(token_model).__name__} is custom code ({package}), not the transformers {family} model"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return f"the {family} backbone is configured as a decoder (causal or cross-attention)"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type is {config.position_embedding_type!r}; unpadded supports absolute only"
    layers = getattr(getattr(token_model, "encoder", None), "layer", None)
    if getattr(token_model, "embeddings", None) is None or not isinstance(layers, nn.ModuleList):
        return f"{type(token_model).__name__} has no embeddings and encoder.layer modules"
    for path, module in _bypassed(token_model):
        if type(module).__module__ != package:
            return f"{path} is a {type(module).__name__} from {type(module).__module__}, not the {family} module"
        reason = _hook_reason(path, module)
        if reason:
            return reason
    return None


def runs_unpadded(token_model: nn.Module) -> bool:
    """Whether the unpadded path runs ``token_model``: :func:`unpadded_support` decided once, at its first
    call (after adapters, FSDP or ``torch.compile`` have been applied), with a warning naming the reason when it
    cannot. Hooks added to the bypassed modules after that first call are not seen."""
    if token_model not in _DECIDED:
        reason = unpadded_support(token_model)
        if reason is not None:
            warnings.warn(f"training.unpadded: the backbone runs padded: {reason}", stacklevel=3)
        _DECIDED[token_model] = reason
    return _DECIDED[token_model] is None


def _padded_position_ids(embeddings: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The position id of every slot of the padded batch, as the embeddings module makes them there."""
    if hasattr(embeddings, "create_position_ids_from_input_ids"):  # RoBERTa: padding_idx + 1 + index among non-pads
        return embeddings.create_position_ids_from_input_ids(input_ids, embeddings.padding_idx)
    return embeddings.position_ids[:, : input_ids.shape[1]].expand_as(input_ids)  # BERT, ELECTRA: the column


@dataclass
class _Layout:
    """Where attention puts the packed tokens: the batch's rows sorted by length and cut into buckets of similar
    length, each padded to its longest row, one after the other in one buffer of slots."""

    slots: torch.Tensor | None  # [real tokens]: the slot of each packed token (None: the packed order itself)
    size: int  # slots in all buckets
    buckets: list[tuple[int, int, int]]  # (first slot, rows, width)
    keys: list[torch.Tensor | None]  # per bucket: which slots hold tokens [rows, 1, 1, width] (None: all)
    additive: list[torch.Tensor | None]  # the same as 0 / -inf to add to the scores (eager kernels)


#: a bucket's fixed cost in the planner's unit (a row of width w costs w * w): a few more small kernel calls per
#: layer. Measured on MiniLM-L6, batch 32, bf16 autocast, CPU: 2048 took 20-30% off the unpadded step on
#: ungrouped batches (56-61% padding) against one bucket, and kept length-grouped batches in one bucket
BUCKET_COST = 2048


def _buckets(lengths: list[int]) -> list[list[int]]:
    """Rows (indices into ``lengths``, longest first) in buckets that minimise the attention cost
    ``rows * width**2`` plus :data:`BUCKET_COST` per bucket; rows without tokens are left out."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    best = [0.0] + [float("inf")] * len(order)  # best[j]: the cheapest cut of order[:j]
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + BUCKET_COST + (j - i) * lengths[order[i]] ** 2
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(order)
    while j > 0:
        out.append(order[cut[j]:j])
        j = cut[j]
    return out[::-1]


def _layout(mask: torch.Tensor, dtype: torch.dtype) -> _Layout:
    lengths = mask.sum(1).tolist()
    batch, width = mask.shape
    if all(n == width for n in lengths):  # nothing padded: one bucket, the batch as it is
        return _Layout(None, batch * width, [(0, batch, width)], [None], [None])
    base = [0] * batch  # slot of each row's first token
    buckets, keys, additive, size = [], [], [], 0
    for rows in _buckets(lengths):
        w = lengths[rows[0]]
        for r, row in enumerate(rows):
            base[row] = size + r * w
        filled = torch.arange(w, device=mask.device)[None] < torch.tensor([lengths[r] for r in rows],
                                                                         device=mask.device)[:, None]
        full = bool(filled.all())
        keys.append(None if full else filled[:, None, None, :])
        additive.append(None if full else torch.zeros(filled.shape, dtype=dtype, device=mask.device).masked_fill(
            ~filled, torch.finfo(dtype).min)[:, None, None, :])
        buckets.append((size, len(rows), w))
        size += len(rows) * w
    counts = mask.sum(1)
    first = torch.cumsum(counts, 0) - counts  # packed index of each row's first token (packed: row by row)
    rank = torch.arange(int(counts.sum()), device=mask.device) - first.repeat_interleave(counts)
    slots = torch.tensor(base, device=mask.device).repeat_interleave(counts) + rank
    return _Layout(slots, size, buckets, keys, additive)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               keys: torch.Tensor | None, additive: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention over padded ``[rows, heads, width, head_dim]`` tensors with the kernels the
    padded path uses: plain matmuls and softmax (``eager``, what training uses on a CPU) or
    ``scaled_dot_product_attention`` (every other implementation; the same function)."""
    p = module.dropout.p if module.training else 0.0
    if module.config._attn_implementation == "eager":  # as transformers' eager_attention_forward
        scores = torch.matmul(query, key.transpose(2, 3)) * module.scaling
        probs = torch.softmax(scores if additive is None else scores + additive, dim=-1)
        return torch.matmul(F.dropout(probs, p, training=module.training), value)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=keys, dropout_p=p, scale=module.scaling)


def _layer(layer: nn.Module, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """One encoder layer on packed states ``x`` [1, real tokens, hidden]."""
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def bucketed(t: torch.Tensor) -> list[torch.Tensor]:  # [1, real, heads*size] -> [rows, heads, width, size]
        t = t[0] if layout.slots is None else t.new_zeros(layout.size, t.shape[-1]).index_copy(0, layout.slots, t[0])
        return [t[o:o + n * w].view(n, w, heads, size).transpose(1, 2) for o, n, w in layout.buckets]

    parts = zip(bucketed(attention.query(x)), bucketed(attention.key(x)), bucketed(attention.value(x)),
                layout.keys, layout.additive)
    context = [_attention(attention, *part).transpose(1, 2).reshape(-1, heads * size) for part in parts]
    context = context[0] if len(context) == 1 else torch.cat(context)
    if layout.slots is not None:
        context = context.index_select(0, layout.slots)
    hidden = layer.attention.output(context.unsqueeze(0), x)
    return layer.output(layer.intermediate(hidden), hidden)


def unpadded_hidden_states(token_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The token model's ``last_hidden_state`` [batch, width, hidden] computed on the real tokens only.

    Args:
        token_model: a model that :func:`unpadded_support` accepts (not checked here).
        input_ids, attention_mask, token_type_ids: the padded batch [batch, width], padded on either side.

    Returns:
        The padded path's states at real positions; zeros at padded ones.
    """
    batch, width = input_ids.shape
    mask = attention_mask.bool()
    flat = mask.reshape(-1)
    real = None if bool(flat.all()) else flat.nonzero().squeeze(1)

    def packed(t: torch.Tensor) -> torch.Tensor:  # [batch, width] -> [1, real tokens], row by row
        t = t.reshape(1, -1)
        return t if real is None else t[:, real]

    embeddings = token_model.embeddings
    x = embeddings(input_ids=packed(input_ids), position_ids=packed(_padded_position_ids(embeddings, input_ids)),
                   token_type_ids=None if token_type_ids is None else packed(token_type_ids))
    project = getattr(token_model, "embeddings_project", None)  # ELECTRA with embedding_size != hidden_size
    if project is not None:
        x = project(x)
    layout = _layout(mask, x.dtype)
    for layer in token_model.encoder.layer if layout.buckets else ():  # no buckets: not one token in the batch
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            # training.gradient_checkpointing: the layer's activations are recomputed in the backward pass (the
            # padded path's layers do this themselves, but this path does not call them as a whole), with the
            # checkpoint function and settings the layer was given
            run = getattr(layer, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
            x = run(_layer, layer, x, layout)
        else:
            x = _layer(layer, x, layout)
    if real is None:
        return x.view(batch, width, -1)
    return x.new_zeros(batch * width, x.shape[-1]).index_copy(0, real, x[0]).view(batch, width, -1)
