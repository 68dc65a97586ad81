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

Under FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2``) the same holds, with the model's parameters
sharded over the processes (``torch.distributed.fsdp.fully_shard``) instead of replicated: FSDP reduce-scatters
the gradients, and whatever reads or writes the whole model goes through the helpers below, which every process
must call (they gather or scatter):

- :func:`full_state_dict` gathers the full (unsharded) weights onto the main process, which writes them
  (checkpoints, ``model/``);
- :func:`load_weights` loads a full weights file into the sharded model;
- :func:`prepare` registers :meth:`MultiTaskModel.infer` with FSDP, so that evaluation gathers the weights
  as ``forward`` does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from safetensors.torch import load_file, load_model

from multitune.errors import ConfigError, MultituneError


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


def fsdp_on_cpu(accelerator: Any) -> None:
    """Shard with FSDP2 on CPU processes when the launch asked for FSDP (``accelerate launch --use_fsdp``).

    Accelerate turns a launch into FSDP only on accelerator devices (in ``AcceleratorState.__init__`` the FSDP
    branch is taken for ``MULTI_GPU``, ``MULTI_XPU``, ... but not ``MULTI_CPU``): on CPU processes (gloo) it
    silently trains with DDP instead. PyTorch's ``fully_shard`` does run on CPU over gloo, so this sets the
    state as Accelerate sets it for GPUs (distributed type FSDP, the plugin read from the launcher's ``FSDP_*``
    environment). Call it right after building the Accelerator; it changes nothing otherwise.

    Raises:
        MultituneError: the launch asked for FSDP version 1 (only FSDP2 runs on CPU).
    """
    state = accelerator.state
    if accelerator.device.type != "cpu" or accelerator.num_processes == 1 \
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" \
            or state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise MultituneError("FSDP on CPU processes needs FSDP2: launch with --use_fsdp --fsdp_version 2")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    # both shared states: AcceleratorState copies PartialState's distributed type whenever it is instantiated
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_fsdp_run(accelerator: Any, strategy: str, weighting: Any, gradual_unfreezing: bool, affinity_every: int,
                   resuming: bool) -> None:
    """Under FSDP, refuse before anything is built what a sharded run does not support: steps that run several
    forward or backward passes and average gradients themselves (loss weightings that take every task in a
    step or work on gradients, the affinity probe), gradual unfreezing (it holds the parameters that sharding
    replaces), and resuming (a checkpoint holds the main process's shard of the optimizer state only).

    Args:
        strategy, weighting: ``loss_weighting.strategy`` and its class (which declares what a step needs).
        gradual_unfreezing: ``training.gradual_unfreezing`` is set.
        affinity_every: ``analysis.affinity_every``.
        resuming: the run resumes from a checkpoint.

    Raises:
        ConfigError: naming the field; MultituneError: for ``--resume``.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if weighting.needs_all_tasks or weighting.needs_per_task_gradients or weighting.needs_shared_layer:
        raise ConfigError("loss_weighting.strategy", f"{strategy} is not supported with FSDP (it takes every task "
                                                     f"in a step, or works on gradients); use a loss-level "
                                                     f"weighting (sum, static, uncertainty, dwa) or DDP")
    if gradual_unfreezing:
        raise ConfigError("training.gradual_unfreezing", "is not supported with FSDP; use DDP")
    if affinity_every:
        raise ConfigError("analysis.affinity_every", "the affinity analysis is not supported with FSDP; set it to "
                                                     "0 or use DDP")
    if resuming:
        raise MultituneError("--resume is not supported with FSDP: a checkpoint holds only the main process's "
                             "shard of the optimizer state; train again, or train with DDP to be able to resume")


def prepare(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer
            ) -> tuple[torch.nn.Module, Any]:
    """``accelerator.prepare(model, optimizer)``, and under FSDP2 what the multi-task model needs:

    - with ``--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP`` and no layer class named, the backbone's
      transformer layers (its ``_no_split_modules``) are sharded as units; the heads and what is left of the
      backbone form the root unit;
    - parameters the optimizer trains outside the model (learned loss weights) stay plain, replicated tensors
      (Accelerate would look for them in the sharded model), in their place in the optimizer's groups;
    - :meth:`~multitune.model.MultiTaskModel.infer` (evaluation) gathers the weights as ``forward`` does.

    Returns:
        ``(model, optimizer)`` as prepared; under FSDP2 the model is the same object, sharded in place, and the
        optimizer holds its new (sharded) parameters.

    Raises:
        MultituneError: FSDP version 1 (its flat parameters do not fit the optimizer's groups built here).
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.prepare(model, optimizer)
    if not accelerator.is_fsdp2:
        raise MultituneError("FSDP version 1 is not supported: launch with --use_fsdp --fsdp_version 2")
    from torch.distributed.fsdp import register_fsdp_forward_method
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and not plugin.transformer_cls_names_to_wrap:
        present = {type(m).__name__ for m in model.modules()}
        plugin.transformer_cls_names_to_wrap = [n for n in getattr(model.backbone, "_no_split_modules", None) or []
                                                if n in present]
    inside = {id(p) for p in model.parameters()}
    outside = [[(i, p) for i, p in enumerate(g["params"]) if id(p) not in inside] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in inside]
    model, optimizer = accelerator.prepare(model, optimizer)
    for group, kept in zip(optimizer.param_groups, outside):
        for i, p in kept:  # ascending positions: each goes back where it was
            group["params"].insert(i, p)
    register_fsdp_forward_method(model, "infer")
    return model, optimizer


def trained_parameters(optimizer: Any) -> list[torch.nn.Parameter]:
    """The parameters ``optimizer`` trains, in its groups' order (after ``prepare``: under FSDP2 the sharded
    ones)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def clip_gradients(accelerator: Any, parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``parameters`` down to a total L2 norm of ``max_norm`` (``inf``: only measure it);
    returns the total norm before clipping.

    Under FSDP2 the gradients of sharded parameters are DTensors: their norm is the sum over processes of each
    shard's squares, while parameters outside the sharded model (learned loss weights) have the same, averaged
    gradient on every process and count once. Accelerate's ``clip_grad_norm_`` handles FSDP only when the list
    it is given is exactly the model's parameters (it returns None otherwise), so the FSDP case is done here.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    with_grad = [p for p in parameters if p.grad is not None]
    parts = ([p for p in with_grad if isinstance(p.grad, DTensor)], [p for p in with_grad if not isinstance(p.grad, DTensor)])
    squares = torch.zeros((), dtype=torch.float32)
    for part in parts:
        if part:
            norm = get_total_norm([p.grad for p in part], 2.0)
            squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().cpu() ** 2
    total = squares.sqrt()
    if math.isfinite(max_norm):
        for part in parts:
            if part:
                clip_grads_with_norm_(part, max_norm, total.to(part[0].grad.device))
    return total


def sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (its weights are then read and written by all processes)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of an FSDP2-sharded model, gathered onto the main process (on CPU); an empty dict on the
    other processes. Every process must call it. None for a model that is not sharded (read it directly)."""
    if not sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load a safetensors file of full weights into ``model`` (strictly). An FSDP2-sharded model takes each
    process's shard of them: every process must call it, and every process reads ``file``."""
    if not sharded(model):
        load_model(model, str(file), strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, load_file(str(file)), options=StateDictOptions(full_state_dict=True, strict=True))
