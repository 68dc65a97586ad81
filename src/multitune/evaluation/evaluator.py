"""Per-task evaluation and the selection metric used by early stopping and checkpointing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from multitune.data.batches import EVAL_BATCH_TOKENS, feature_length, length_batches
from multitune.tasks.base import Task


def eval_batches(task: Task, features: Sequence[dict], batch_size: int, pad_token_id: int,
                 max_tokens: int | None = EVAL_BATCH_TOKENS):
    """Yield ``(indices, batch)`` over all features in length order (less padding), at most ``batch_size`` rows
    and ``max_tokens`` padded tokens a batch; order is restored by the caller through the indices. A fixed
    generator keeps evaluation masks identical across evals."""
    start = 0
    for idx in length_batches([feature_length(f) for f in features], batch_size, max_tokens):
        yield idx, task.collate([features[i] for i in idx], pad_token_id,
                                torch.Generator().manual_seed(getattr(task.config, "eval_seed", 0) + start))
        start += len(idx)


@torch.inference_mode()
def evaluate_task(model: Any, task: Task, features: Sequence[dict], examples: Sequence[dict], batch_size: int,
                  pad_token_id: int, max_tokens: int | None = EVAL_BATCH_TOKENS) -> tuple[dict[str, float], list[Any]]:
    """Predict every example of a split and score the predictions, in batches of at most ``batch_size`` rows and
    ``max_tokens`` padded tokens.

    Returns:
        (metrics, predictions in the order of ``examples``).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions: list[Any] = [None] * len(examples)
    try:
        for idx, batch in eval_batches(task, features, batch_size, pad_token_id, max_tokens):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.infer(task.name, batch)
            for i, p in zip(idx, task.decode(out, batch, [examples[i] for i in idx])):
                predictions[i] = p
    finally:
        model.train(was_training)
    return task.compute_metrics(predictions, examples), predictions


def selection_value(metric: str, results: dict[str, dict[str, float]], tasks: dict[str, Task]) -> float:
    """The higher-is-better number that picks the best checkpoint.

    ``mean``: the mean over tasks of each task's main metric (lower-is-better metrics negated);
    ``task/metric``: that one value, negated when the task says lower is better (loss, mse, perplexity).
    """
    if metric == "mean":
        return sum(tasks[t].selection_score(m) for t, m in results.items()) / len(results)
    task, _, name = metric.partition("/")
    value = results[task][name]
    return value if tasks[task].greater_is_better_for(name) else -value
