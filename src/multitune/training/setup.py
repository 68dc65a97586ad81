"""Builders of a training run: each turns a part of the config into the objects the loop uses.

They are called in this order by :func:`multitune.training.train` (the order fixes how random numbers are drawn,
so a run is reproducible and a resumed run bitwise equal): accelerator -> backbone -> model -> (tokenisation)
-> loss weighting -> optimisation -> batchers and sampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from multitune.adapters import METHODS
from multitune.backbones import load_backbone
from multitune.backbones.dropout import use_packed_mask_dropout
from multitune.backbones.packing import pack_batch, packing_problem
from multitune.backbones.quantize import quantize_linear_layers
from multitune.backbones.vocab import extend_vocabulary, find_new_words, read_corpus
from multitune.config.schema import RunConfig, TrainingConfig
from multitune.errors import ConfigError, MultituneError
from multitune.model import ADAPTERS_FILE, HEADS_FILE, MultiTaskModel
from multitune.optim import (
    GradualUnfreezer,
    apply_freezing,
    build_optimizer,
    build_param_groups,
    build_scheduler,
)
from multitune.sampling import SAMPLERS
from multitune.sampling.replay import ReplaySampler
from multitune.tasks import Task
from multitune.training.batching import TaskBatcher
from multitune.training.distributed import ddp_kwargs, fsdp_on_cpu
from multitune.training.hardware import resolve_attention, resolve_precision


def build_accelerator(device: str, precision: str) -> tuple[Any, str, bool]:
    """An Accelerator for ``training.device`` and ``training.precision``.

    Returns:
        ``(accelerator, resolved precision, on_cpu)``.

    Raises:
        MultituneError: CUDA was asked for and there is none.
    """

    # Accelerate keeps one process-wide state; a second run in the same process (a notebook, a search)
    # may ask for another precision. Reset it, keeping the process group (PartialState) intact.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    resolved = resolve_precision(precision, "cpu" if on_cpu else "cuda")
    accelerator = Accelerator(mixed_precision="bf16" if resolved == "bf16" else "no", cpu=on_cpu,
                              kwargs_handlers=ddp_kwargs())
    fsdp_on_cpu(accelerator)  # Accelerate would train an FSDP launch on CPU processes with DDP
    if device == "cuda" and not torch.cuda.is_available():
        raise MultituneError("training.device: cuda was asked for but no CUDA device is available")
    return accelerator, resolved, on_cpu


@dataclass
class Backbone:
    """The loaded backbone and what was done to it before the model is built."""

    model: Any
    tokenizer: Any
    deployed_attention: str | None  # the kernels a loaded model gets: evaluation runs with these
    vocab_report: dict | None


def build_backbone(config: RunConfig, attention: str | None, on_cpu: bool) -> Backbone:
    """Load the backbone, set its training attention kernels, extend its vocabulary (before the heads and the
    tokenisation see it) and, with ``adapters.quantize``, make its frozen linear layers k-bit."""
    backbone, tokenizer = load_backbone(config.backbone, config.trust_remote_code)
    wanted = resolve_attention(attention, on_cpu)
    # evaluation runs with the kernels a loaded model gets (multitune.load, predict, serve), so that the metrics
    # that pick checkpoints are the ones the saved model reproduces
    deployed = getattr(backbone.config, "_attn_implementation", None)
    if wanted is not None and deployed != wanted:
        try:
            backbone.set_attn_implementation(wanted)
        except (ValueError, ImportError) as exc:
            raise ConfigError("training.attention", f"{wanted} does not work with this backbone: "
                                                    f"{' '.join(str(exc).split())[:200]}") from None
    report = None
    if config.backbone.extend_vocabulary is not None:
        v = config.backbone.extend_vocabulary
        words = find_new_words(read_corpus(v.corpus), tokenizer, v.min_freq, v.max_new)
        report = extend_vocabulary(backbone, tokenizer, [w for w, _ in words])
    if config.adapters is not None and config.adapters.quantize is not None:
        quantize_linear_layers(backbone, config.adapters.quantize)
    return Backbone(backbone, tokenizer, deployed, report)


def build_model(config: RunConfig, tasks: dict[str, Task], backbone: Backbone, init_from: Path | None
                ) -> MultiTaskModel:
    """The multi-task model on the backbone; a later stage starts from the previous stage's heads and adapters.

    Raises:
        MultituneError: the previous stage's adapters do not match this run's.
    """
    family = None if config.backbone.type == "auto" else config.backbone.type
    model = MultiTaskModel(backbone.model, tasks, backbone.tokenizer, config.pooling, config.normalize_embeddings,
                           config.training.max_length, architecture=family, adapters=config.adapters)
    model.unpadded = config.training.unpadded  # decided at the first batch (multitune.backbones.unpadded)
    use_packed_mask_dropout(model)  # same dropout, a third of the random draws on a CPU
    if init_from is not None:  # heads (and adapters) trained by the previous stage
        model.heads.load_state_dict(load_file(str(init_from / HEADS_FILE)), strict=True)
        if model.adapters is not None and (init_from / ADAPTERS_FILE).is_file():
            # an AdapterFusion stage starts from per-task adapters: its fusion layers are new
            result = model.adapters.load_state_dict(load_file(str(init_from / ADAPTERS_FILE)), strict=False)
            new = [k for k in result.missing_keys if not k.startswith("fusion.")]
            if new or result.unexpected_keys:
                raise MultituneError(f"{init_from / ADAPTERS_FILE}: adapters do not match this run (missing "
                                     f"{new[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model


def apply_gradient_checkpointing(backbone: torch.nn.Module, adapters: Any = None) -> None:
    """``training.gradient_checkpointing``: every layer of the backbone recomputes its activations in the backward
    pass (torch's non-reentrant checkpointing, which needs no input that requires a gradient, so frozen
    embeddings need nothing more; the recomputation runs with the adapter routing of the forward pass).
    Evaluation, generation and frozen parts run as before.

    Args:
        backbone: the transformers model.
        adapters: the :class:`~multitune.adapters.AdapterSet` attached to it, if any.

    Raises:
        ConfigError: naming ``training.gradient_checkpointing``: the backbone does not support it, or the adapter
            method feeds the layers a key/value cache (prefix tuning), which recomputed layers would drop.
    """
    field = "training.gradient_checkpointing"
    if adapters is not None and adapters.method.feeds_cache:
        raise ConfigError(field, f"not with adapters.method {adapters.config.method}: its prefix reaches the "
                                 f"layers as a key/value cache, which checkpointed layers drop; set one of them")
    if not getattr(backbone, "supports_gradient_checkpointing", False):
        raise ConfigError(field, f"{type(backbone).__name__} does not support gradient checkpointing")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if adapters is not None:  # the backward pass recomputes a layer outside the forward's adapter routing
        kwargs["context_fn"] = lambda: (contextlib.nullcontext(), adapters.recompute_context())
    enable = getattr(backbone, "activation_checkpointing_enable", None)  # transformers >= 5.x; the older name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # for reentrant checkpointing only: with the embeddings' outputs requiring a gradient, a frozen backbone
    # (feature extraction) would back-propagate through every layer for nothing
    backbone.disable_input_require_grads()


def build_packing(config: RunConfig, model: MultiTaskModel) -> Callable[[dict], dict] | None:
    """``training.packing``: the function that packs a packable task's collated training batch (None: off), once
    it is known that packed examples stay isolated on this backbone (:mod:`multitune.backbones.packing`). Call it
    with the training attention kernels set, before the model moves to a device or is compiled.

    Raises:
        ConfigError: naming ``training.packing``: the backbone family does not pack, no task is packable, or
            the attention implementation or model family would let packed examples attend to each other.
    """
    if not config.training.packing:
        return None
    field, arch = "training.packing", model.architecture
    if not arch.packs:
        raise ConfigError(field, f"packs the text2text training batches of decoder_only backbones; this backbone "
                                 f"is {arch.type_name} (set packing: false)")
    if not any(task.packable for task in model.tasks.values()):
        raise ConfigError(field, "no task of this run has batches to pack (text2text tasks); set packing: false")
    problem = packing_problem(model.backbone)
    if problem is not None:
        raise ConfigError(field, f"{problem}; set training.attention: eager or sdpa, or packing: false")
    return functools.partial(pack_batch, max_length=config.training.max_length, pad_id=arch.pad_id)


@dataclass
class Optimization:
    """What trains and how: parameter groups (one table row per part), optimizer, LR schedule (and its warmup
    steps), unfreezing."""

    groups: list[dict]
    new_modules: list[tuple]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    unfreezer: GradualUnfreezer | None
    warmup_steps: int = 0
    #: word-embedding parameters the default would freeze, and whether they are frozen (the fast-path line)
    word_embeddings: tuple[int, bool] = (0, False)


def build_optimization(model: MultiTaskModel, weighting: torch.nn.Module, config: RunConfig,
                       train_examples: int, num_processes: int) -> Optimization:
    """Freeze what the config freezes, group the trainable parameters with their learning rates, and build the
    optimizer, the scheduler and the gradual unfreezer.

    Args:
        train_examples: training examples of every task (an epoch, for gradual unfreezing).
        num_processes: data-parallel processes (each step draws ``num_processes x batch_size`` rows).

    Raises:
        MultituneError: nothing is left to train.
    """
    tcfg: TrainingConfig = config.training
    head_lr = tcfg.head_learning_rate or default_head_learning_rate(config, model)
    freeze, by_default = config.freeze, word_embeddings_frozen_by_default(config, model)
    if freeze.word_embeddings is None:
        freeze = dataclasses.replace(freeze, word_embeddings=by_default)
    apply_freezing(model.backbone, model.heads, freeze)
    # for the fast-path line: what the default freezes here (0 where adapters or other settings freeze it anyway)
    words = model.backbone.get_input_embeddings().weight
    decided = by_default and model.adapters is None and not (freeze.backbone or freeze.embeddings)
    word_embeddings = (words.numel() if decided else 0, not words.requires_grad)
    weighting_lr = weighting.parameter_learning_rate()
    new_modules: list[tuple] = [("heads", model.heads),
                                ("loss_weighting", weighting, *([weighting_lr] if weighting_lr else []))]
    if model.adapters is not None:  # parameter-efficient: the backbone stays frozen, adapters train
        model.backbone.requires_grad_(False)
        adapter_lr = config.adapters.learning_rate or METHODS.get(config.adapters.method).default_learning_rate
        if model.adapters.fusion is not None:  # AdapterFusion: the task adapters stay as trained, fusion learns
            model.adapters.adapters.requires_grad_(False)
            new_modules.append(("fusion", model.adapters.fusion, config.adapters.fusion_learning_rate))
        # the ModuleDict gives one table row per adapter; the set itself adds what is left (task embeddings)
        new_modules += [("adapters", model.adapters.adapters, adapter_lr), ("adapters", model.adapters, adapter_lr)]
    groups = build_param_groups(model.backbone, new_modules, tcfg.learning_rate, head_lr, tcfg.weight_decay,
                                tcfg.layer_lr_decay)
    if not groups:
        raise MultituneError("freeze: nothing is left to train (every backbone and head parameter is frozen)")
    unfreezer = None
    if tcfg.gradual_unfreezing is not None:  # after the groups: the optimizer must hold what it releases later
        steps_per_epoch = math.ceil(train_examples / (tcfg.batch_size * num_processes))
        unfreezer = GradualUnfreezer(model.backbone, tcfg.gradual_unfreezing, steps_per_epoch)
    optimizer = build_optimizer(groups, tcfg.learning_rate)
    warmup = schedule_warmup(tcfg)
    scheduler = build_scheduler(optimizer, tcfg.scheduler, warmup, tcfg.max_steps)
    return Optimization(groups, new_modules, optimizer, scheduler, unfreezer, warmup, word_embeddings)


def word_embeddings_frozen_by_default(config: RunConfig, model: MultiTaskModel) -> bool:
    """``freeze.word_embeddings: null``: freeze the word-embedding matrix of an encoder whose vocabulary is not
    extended, unless a task's output layer is that matrix. On the seed mixture, training it did not change the
    dev metrics (docs/benchmarks.md, "Word embeddings frozen by default"), while its gradient and AdamW state cost memory and
    time for a matrix a batch touches a few hundred rows of. New rows of an extended vocabulary must learn."""
    return (model.architecture.type_name == "encoder" and config.backbone.extend_vocabulary is None
            and not any(t.outputs_word_embeddings for t in model.tasks.values()))


#: the heads' rate on a backbone that adapters keep frozen: at the backbone's 5e-5 (or 1e-3) the seed mixture's
#: NER head stayed on the all-O plateau for 300 steps with every method; at 1e-2 every method learned it
#: (docs/benchmarks.md, "Adapters: learning rates of the adapters and the heads")
ADAPTER_HEAD_LEARNING_RATE = 1e-2


def default_head_learning_rate(config: RunConfig, model: MultiTaskModel) -> float:
    """``training.head_learning_rate`` when it is not set: :data:`ADAPTER_HEAD_LEARNING_RATE` with adapters;
    on a fine-tuned backbone, the tasks' own rate (:meth:`~multitune.tasks.base.Task.new_head_learning_rate`)
    when every task with head parameters has one (the lowest), else ``training.learning_rate``."""
    if config.adapters is not None:
        return ADAPTER_HEAD_LEARNING_RATE
    rates = [model.tasks[n].new_head_learning_rate() for n, head in model.heads.items()
             if any(True for _ in head.parameters())]
    if rates and None not in rates:
        return min(r for r in rates if r is not None)
    return config.training.learning_rate


def schedule_warmup(tcfg: TrainingConfig) -> int:
    """The warmup steps of a run that starts now: ``warmup_steps``, else ``warmup_ratio`` of ``max_steps``."""
    return tcfg.warmup_steps if tcfg.warmup_steps is not None else int(tcfg.warmup_ratio * tcfg.max_steps)


def continue_schedule(scheduler: Any, tcfg: TrainingConfig, step: int, trained_for: int | None,
                      trained_warmup: int | None) -> tuple[Any, int]:
    """The learning-rate schedule of a resumed run, standing at its checkpoint's ``step``.

    Resumed with the same ``training.max_steps`` the checkpoint was trained for, the run continues on the very
    same schedule (bit for bit). Resumed with another ``max_steps`` (extended; or an interrupted run shortened,
    never below the steps made), the schedule is rebuilt for the new total:

    - warmup keeps the length it had when the run started (``trained_warmup``; ``warmup_ratio`` is not applied
      to the new ``max_steps`` again), so warmup already done stays done;
    - the ``linear`` or ``cosine`` decay runs from the end of warmup to the new ``max_steps``, and the learning
      rate continues from the new schedule's value at ``step``. A finished run whose rate had decayed to 0
      so starts again at ``lr * (1 - (step - warmup) / (max_steps - warmup))`` (linear) and decays to 0 at the
      new ``max_steps``: the extension is a continuation of one longer schedule, not a second warmup and decay.
      ``constant`` stays constant.

    Args:
        scheduler: the run's scheduler, built for ``tcfg`` with the checkpoint's state loaded into it.
        trained_for, trained_warmup: the ``max_steps`` and warmup steps the checkpoint was trained with (None in
            a checkpoint from before they were recorded: then this config's).

    Returns:
        ``(scheduler, warmup steps)``: the same scheduler when nothing changed, else a rebuilt one whose
        optimizer learning rates are set for the next step.
    """
    warmup = trained_warmup if trained_warmup is not None else schedule_warmup(tcfg)
    if trained_for == tcfg.max_steps and warmup == schedule_warmup(tcfg):
        return scheduler, warmup
    saved = scheduler.state_dict()
    rebuilt = build_scheduler(scheduler.optimizer, tcfg.scheduler, warmup, tcfg.max_steps)
    rebuilt.load_state_dict(saved)  # its position (last_epoch = step) and base rates; the factor is the new one
    for group, base, factor in zip(rebuilt.optimizer.param_groups, rebuilt.base_lrs, rebuilt.lr_lambdas):
        group["lr"] = base * factor(step)  # the rate of the next optimizer step, as LambdaLR.step would set it
    rebuilt._last_lr = [group["lr"] for group in rebuilt.optimizer.param_groups]
    return rebuilt, warmup


def build_sampling(config: RunConfig, train_features: dict[str, list[dict]], tasks: dict[str, Task],
                   active: list[str], replayed: list[str], replay: float, pad_id: int, global_batch: int,
                   pack: Callable[[dict], dict] | None = None) -> tuple[dict[str, TaskBatcher], Any, Any]:
    """One batch stream per task and the task sampler over the active tasks (wrapped to replay earlier tasks'
    batches in a later stage); ``pack`` (:func:`build_packing`) packs the batches of packable tasks.

    Returns:
        ``(batchers, sampler, strategy)``: ``strategy`` is the configured sampler itself, which declares what it
        needs; ``sampler`` is what draws (the strategy, or the replay wrapper around it).
    """
    batchers = {n: TaskBatcher(tasks[n], features, global_batch, pad_id, config.seed + 1000 * (i + 1),
                               config.training.group_by_length, pack if tasks[n].packable else None)
                for i, (n, features) in enumerate(train_features.items())}
    sizes = {n: len(features) for n, features in train_features.items()}
    strategy = SAMPLERS.get(config.sampling.strategy)({n: sizes[n] for n in active}, config.sampling, config.seed)
    sampler = strategy
    if replay > 0 and replayed:
        proportional = SAMPLERS.get("proportional")
        earlier = proportional({n: sizes[n] for n in replayed},
                               proportional.config_class(draws=config.sampling.draws), config.seed + 1)
        sampler = ReplaySampler(strategy, earlier, replay, config.seed + 2)
    return batchers, sampler, strategy
