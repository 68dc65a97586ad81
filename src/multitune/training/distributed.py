"""Data-parallel training on several processes (``accelerate launch``): what the one training loop needs so
that every process trains on its share of each global batch and every replica stays identical.

Semantics, with ``W`` processes and ``training.batch_size`` ``B``:

- every process draws the same task sequence (the sampler's seed is the run's), and the same global batch
  of ``W x B`` examples from the task's stream (the batchers are built with ``W x B``); process ``r`` trains
  on rows ``[r B, (r + 1) B)`` of it. A run on ``W`` processes therefore sees the batches a one-process run
  with ``batch_size: W x B`` would see, in the same order;
- DDP averages the gradients of the model (heads a step does not use get none: ``find_unused_parameters``);
  :func:`average_gradients` does the same for parameters outside the DDP module (learned loss weights);
- every process evaluates every task on the same (identical) weights, so early stopping decides alike;
  only the main process writes files.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedDataParallelKwargs


def ddp_kwargs() -> list:
    """Accelerate kwargs handlers for DDP: a step trains one task, so other tasks' heads get no gradient."""
    return [DistributedDataParallelKwargs(find_unused_parameters=True)]


def shard_batch(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Process ``rank``'s contiguous share of a global batch (every tensor is cut along its first dimension).

    Shares differ by at most one row. A process whose share would be empty (a global batch with fewer rows than
    processes: the end of an epoch) gets the last row, so that every process runs forward and backward.

    Args:
        batch: a collated global batch; tensors whose first dimension is the batch's rows are cut.
        rank: this process's index.
        world_size: the number of processes.

    Returns:
        The share, as a batch.
    """
    if world_size == 1:
        return batch
    rows = len(batch["input_ids"])
    start, end = rows * rank // world_size, rows * (rank + 1) // world_size
    if start == end:
        start, end = rows - 1, rows
    return {k: v[start:end] if isinstance(v, torch.Tensor) and v.dim() and len(v) == rows else v
            for k, v in batch.items()}


def average_gradients(module: torch.nn.Module, accelerator: Any) -> None:
    """Average the gradients of ``module``'s parameters over processes (for parameters DDP does not hold)."""
    if accelerator.num_processes == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad /= accelerator.num_processes


def all_processes(flag: bool, accelerator: Any) -> bool:
    """True when ``flag`` is true on every process, so that all processes take the same branch (e.g. skip a
    step with a non-finite loss together, or DDP would wait for the ones that skipped)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() == 1.0)
