"""Where each backbone parameter sits in depth: embeddings, transformer layer i, or the top.

Layer-wise learning rates, layer freezing and gradual unfreezing all need the same map, read from
parameter names so that it works for every transformers family: BERT-style ``encoder.layer.3.``,
LLaMA/BART ``layers.3.``, GPT-2 ``h.3.``, T5 ``block.3.``. An encoder-decoder has two stacks; layer i
of the encoder and layer i of the decoder share depth i.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embeddings?|embed_tokens|embed_positions|wte|wpe|shared|word_embeddings)\b")

EMBEDDINGS = 0  # depth of the embedding parameters; layers are 1..L, the top (pooler, final norm) is L+1


def parameter_depths(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> tuple[dict[str, int], int]:
    """Map every parameter name to its depth and return ``(depths, num_layers)``.

    Depth 0 is the embeddings, 1..L the transformer layers (bottom to top), L+1 everything above the last
    layer (pooler, final layer norm). Parameters of neither kind that sit below no layer (e.g. a relative
    position bias stored outside the blocks) count as top.
    """
    names = [name for name, _ in named_parameters]
    indices = {}
    for name in names:
        m = _LAYER.search(name)
        if m:
            indices[name] = int(m.group(1))
    num_layers = max(indices.values(), default=-1) + 1
    depths = {}
    for name in names:
        if name in indices:
            depths[name] = indices[name] + 1
        elif _EMBEDDING.search(name):
            depths[name] = EMBEDDINGS
        else:
            depths[name] = num_layers + 1
    return depths, num_layers


def depth_label(depth: int, num_layers: int) -> str:
    if depth == EMBEDDINGS:
        return "embeddings"
    if depth > num_layers:
        return "top"
    return f"layer_{depth - 1:02d}"


def unfreeze_order(num_layers: int) -> list[list[int]]:
    """Layer groups from the top down, as gradual unfreezing releases them (Howard & Ruder 2018):
    the top (last layer with pooler / final norm), each layer below, the embeddings last."""
    groups = [[num_layers, num_layers + 1]] if num_layers else [[num_layers + 1]]
    groups += [[d] for d in range(num_layers - 1, 0, -1)]
    groups.append([EMBEDDINGS])
    return groups
