"""Sequence packing of decoder-only training batches (``training.packing``).

A text-to-text batch on a causal LM is padded to its longest example: with examples of mixed length, most
of its token slots can be padding. Packing puts the batch's examples (the same examples, drawn as without
packing) one after the other into as few rows as fit ``max(training.max_length, longest example)`` tokens
(first-fit decreasing), so that nearly every slot holds a real token.

Examples sharing a row must not see each other. Each example's position ids restart at 0, and the batch
goes to the model with ``position_ids`` and *without* an attention mask: transformers (5.x) then finds the
examples from the position ids (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal
causal mask for the ``eager``, ``sdpa`` and ``flex_attention`` kernels; the ``flash_attention_*`` kernels
find them the same way (varlen kernels) only when the batch is one row, so for those the rows are joined
into one row. Each example so gets the same positions and attends to the same tokens as in its own row,
and its logits, loss and gradients are those of the unpacked batch (float rounding aside). The loss stays
the mean over every trained token of the batch.

A model family whose code ignores packed position ids, or an attention implementation that builds no mask
from them, would let examples attend across their boundaries: :func:`packing_problem` refuses those, by
the implementation's name and by a probe forward pass that compares a packed pair of short inputs with the
same inputs run apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100

#: attention implementations whose mask transformers builds from packed position ids, per row
ROW_KERNELS = ("eager", "sdpa", "flex_attention")
#: attention implementations that find packed examples from position ids only in a batch of one row
ONE_ROW_KERNELS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into ``lengths`` whose lengths sum to at most ``capacity`` each: longest first, each into
    the first bin with room (a length above ``capacity`` gets a bin of its own).

    Args:
        lengths: the length of each item.
        capacity: the most tokens a bin holds.

    Returns:
        The bins, in order of creation; each bin's indices in the order they were placed.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def pack_batch(batch: dict[str, torch.Tensor], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack a collated decoder-only training batch into fewer rows.

    Args:
        batch: ``input_ids``, ``attention_mask`` and ``labels`` [examples, width], right-padded, labels unshifted
            (``labels[t]`` is ``input_ids[t]`` where token ``t`` is trained, -100 elsewhere), as
            :meth:`~multitune.backbones.architectures.DecoderOnlyArchitecture.text2text_collate` builds them;
            other keys (the generation prompts) are dropped.
        max_length: ``training.max_length``; a row holds ``max(max_length, longest example)`` tokens.
        pad_id: the id of padding slots.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` [rows, width'] (position ids restart at 0 with every
        example, and at each row's padding, which forms a segment of its own), ``attention_mask`` (1 on real
        tokens: what the step counters read; never given to the model) and ``packed_examples`` (a 0-dim
        tensor: the examples packed). The label of each example's first token is -100 (no token before it
        predicts it, as in its own row); no ``labels`` when the batch has none.
    """
    lengths = [int(n) for n in batch["attention_mask"].sum(1).tolist()]
    capacity = max(max_length, max(lengths, default=0))
    rows = first_fit_decreasing(lengths, capacity)
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = batch["input_ids"][i, :n]
            if "labels" in batch:
                labels[r, at + 1:at + n] = batch["labels"][i, 1:n]
            positions[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)
    packed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
              "packed_examples": torch.tensor(len(lengths))}
    if "labels" in batch:  # as unpacked: a batch without a trained token has none
        packed["labels"] = labels
    return packed


def packed_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM's logits [rows, width, vocab] of a packed batch (see :func:`pack_batch`): given
    ``position_ids`` and no attention mask, as one row for the ``flash_attention_*`` kernels."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    if getattr(model.config, "_attn_implementation", None) in ONE_ROW_KERNELS and len(ids) > 1:
        logits = model(input_ids=ids.reshape(1, -1), position_ids=positions.reshape(1, -1), use_cache=False).logits
        return logits.reshape(*ids.shape, -1)
    return model(input_ids=ids, position_ids=positions, use_cache=False).logits


def _accepts_position_ids(model: Any) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def leaks_across_examples(model: Any, length: int = 4) -> bool:
    """Whether ``model`` lets a packed example attend to the one before it: two ``length``-token inputs packed
    into one row, in eval mode (no dropout). The second input's logits there are compared with its logits run
    alone, and that difference with the one a leak makes (the same row with an all-ones attention mask, which
    turns transformers' packed-sequence detection off): isolated examples differ by float rounding only, a
    tenth of the leak's difference at most, whatever the dtype.

    Args:
        model: a transformers causal LM (on any device the attention implementation runs on).
        length: tokens of each probe input.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = int(getattr(model.config, "vocab_size", 2))
        ids = ((torch.arange(2 * length, device=device) * 7 + 3) % vocab)[None]
        positions = torch.arange(length, device=device).repeat(2)[None]
        packed = packed_logits(model, {"input_ids": ids, "position_ids": positions})[0, length:].float()
        alone = model(input_ids=ids[:, length:], use_cache=False).logits[0].float()
        leaked = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                       use_cache=False).logits[0, length:].float()
        rounding = 1e-6 * float(alone.abs().max())
        return float((packed - alone).abs().max()) > max(0.1 * float((leaked - alone).abs().max()), rounding)
    finally:
        model.train(was_training)


def packing_problem(model: Any, probe: bool = True) -> str | None:
    """Why packed examples would not be isolated on ``model``, or None when they are.

    Args:
        model: the transformers causal LM that trains (attention implementation as set for training).
        probe: also run :func:`leaks_across_examples` (only where the implementation runs on the model's
            device: ``eager`` and ``sdpa`` anywhere, the others on a GPU).

    Returns:
        None, or one sentence naming the attention implementation and what is wrong.
    """
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ROW_KERNELS + ONE_ROW_KERNELS:
        return (f"attention implementation {impl!r} builds no mask from packed position ids, so packed examples "
                f"would attend to each other (packing isolates them with {', '.join(ROW_KERNELS + ONE_ROW_KERNELS)})")
    if not _accepts_position_ids(model):
        return f"{type(model).__name__} takes no position_ids, so it cannot tell packed examples apart"
    on_gpu = next(model.parameters()).device.type != "cpu"
    if probe and (impl in ("eager", "sdpa") or on_gpu) and leaks_across_examples(model):
        return (f"{type(model).__name__} with attention implementation {impl!r} lets a packed example attend to "
                f"the one before it (a probe pass differs from the examples run apart)")
    return None
