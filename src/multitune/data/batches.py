"""Evaluation and prediction batches: inputs in length order, each batch bounded in rows and in padded tokens.

Training batches are drawn by :mod:`multitune.sampling` and :mod:`multitune.training.batching`; this module cuts
a fixed set of inputs (a validation split, a prediction request) into batches whose padding is small and whose
memory is bounded whatever ``max_length`` is: a batch holds at most ``max_rows`` rows and at most
``max_tokens`` tokens counted as rows x its longest row (what the padded tensors hold).
"""

from __future__ import annotations

from collections.abc import Sequence

#: padded tokens per evaluation or prediction batch unless the config says otherwise (64 rows of 128 tokens)
EVAL_BATCH_TOKENS = 8192


def feature_length(feature: dict) -> int:
    """Tokens a tokenised input puts into a batch: its ids, and a bi-encoder pair's second side."""
    return len(feature["input_ids"]) + len(feature.get("pair_input_ids", ()))


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int | None = EVAL_BATCH_TOKENS
                   ) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches in ascending length order.

    Args:
        lengths: the token count of each input.
        max_rows: rows per batch at most.
        max_tokens: padded tokens per batch at most (rows x the batch's longest row); None bounds only rows.
            An input longer than ``max_tokens`` is a batch of its own.

    Returns:
        The batches, each a list of indices into ``lengths``; every index appears exactly once.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # ascending order: the new row is the batch's longest
        too_many = len(current) >= max_rows
        too_long = max_tokens is not None and (len(current) + 1) * max(lengths[i], 1) > max_tokens
        if current and (too_many or too_long):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
