"""One training run: build it, start it, loop, finish. Every task, sampler, loss weighting and adapter method goes
through :func:`train_run`; staged and AdapterFusion runs are plans of such runs (:mod:`multitune.training.plan`).

Order of work, so that bad input fails before anything is written or computed:
read + check all data -> load backbone -> tokenise once -> build model/optimizer -> (restore a checkpoint)
-> open the run directory -> loop with callbacks -> restore best -> final evaluation -> save.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from multitune.config.loader import save_config
from multitune.config.schema import RunConfig
from multitune.data.fingerprint import check_unchanged, data_files, fingerprints
from multitune.errors import ConfigError, MultituneError
from multitune.fileio import discard_stale_copy, read_jsonl, write_json_atomic, write_text_atomic
from multitune.optim import parameter_table
from multitune.rundir import check_output_dir, clear_dir, lock_dir, lock_scope, write_marker
from multitune.sampling import SAMPLERS
from multitune.tasks.prepared import build_tasks, read_task_data, tokenize_all
from multitune.training.affinity import AffinityProbe
from multitune.training.batching import padding_share
from multitune.training.callbacks import (
    Callback,
    Callbacks,
    Checkpointer,
    DiskUse,
    MetricsLogger,
    ModelSelection,
    SamplerSchedule,
    StepTimer,
    Unfreezing,
)
from multitune.training.checkpoint import STATE_FILE, find_checkpoint, load_checkpoint
from multitune.training.distributed import check_fsdp_run, prepare, sharded, trained_parameters
from multitune.training.finish import finish_run
from multitune.training.hardware import bf16_supported
from multitune.training.loop import train_loop
from multitune.training.multistep import WeightedStep
from multitune.training.per_task import PER_TASK_DIR, PerTaskBest
from multitune.training.progress import (
    TrainingProgress,
    fast_path_summary,
    live_display,
    print_parameter_table,
    stderr_console,
)
from multitune.training.run import Run, StagePlan
from multitune.training.run_dir import CHECKPOINTS, check_run_dir, finished_results
from multitune.training.runlog import RunLog
from multitune.training.setup import (
    apply_gradient_checkpointing,
    build_accelerator,
    build_backbone,
    build_model,
    build_optimization,
    build_packing,
    build_sampling,
    continue_schedule,
)
from multitune.training.state import TrainerState
from multitune.training.trackers import Trackers
from multitune.weighting import WEIGHTINGS

__all__ = ["CHECKPOINTS", "Setup", "StagePlan", "build_run", "build_tasks", "default_callbacks", "train_run"]


@dataclass
class Setup:
    """What building a run found out, for the console, ``parameters.json`` and ``results.json``."""

    precision: str
    tokenize_s: float
    vocab_report: dict | None
    parameters: list[dict]
    unfreezer: Any
    resume_from: Path | None
    word_embeddings: tuple[int, bool] = (0, False)


def train_run(config: RunConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None,
              progress: bool = True, plan: StagePlan | None = None, callbacks: Sequence[Callback] = (),
              accept_changed_data: bool = False, protect: tuple[Path, ...] = ()) -> dict:
    """Train one model as ``config`` says (one stage of it when ``plan`` is given) and write its run directory.

    Args and raises as :func:`multitune.training.train`; ``callbacks`` come after the built-in ones.

    Returns:
        The content of ``results.json``.
    """
    console = console or stderr_console()
    with lock_scope():
        run, setup = build_run(config, resume, overwrite, console, progress, plan, accept_changed_data, protect)
        # a finished run with nothing left to train says so and returns its results (its checkpoint is loaded,
        # nothing is trained or written again), so a script that resumes until a run is done may call this again
        done = finished_results(config, run.out) if run.resumed and plan is None else None
        if done is not None:
            discard_stale_checkpoints(run)
            early = " (early stopping stopped it)" if done["train"].get("stopped_early") else ""
            console.print(f"{run.out}: the run is already finished at step {run.state.step}{early}; to train it "
                          f"further, resume it with a larger training.max_steps, e.g. --resume --set "
                          f"training.max_steps={2 * config.training.max_steps}", markup=False, highlight=False)
            return done
        run.callbacks = Callbacks([*default_callbacks(run, setup), *callbacks])
        open_run_dir(run, setup, resume, overwrite, plan, protect)
        run.callbacks.fire("on_run_start", run)
        run.core.train()
        run.bar = TrainingProgress(run.console, config.training.max_steps,
                                   enabled=progress and run.main_process and live_display(run.console))
        run.bar.start(run.state.step)
        try:
            train_loop(run)
        finally:
            run.bar.stop()
        return finish_run(run, setup)


def build_run(config: RunConfig, resume: bool, overwrite: bool, console: Console, progress: bool,
              plan: StagePlan | None, accept_changed_data: bool, protect: tuple[Path, ...]) -> tuple[Run, Setup]:
    """Read and check the data, build every object of the run and restore a checkpoint; writes nothing.

    The builders run in an order that fixes how random numbers are drawn (a run is reproducible, a resumed run
    bitwise equal): accelerator -> seed -> backbone -> model -> tokenisation -> weighting -> optimisation ->
    batchers and sampler -> checkpoint.
    """
    tcfg, out = config.training, Path(config.output_dir)
    tasks = build_tasks(config)
    _check_sampling(config, list(tasks))
    prepared = read_task_data(config, tasks)
    resuming = check_run_dir(config, out, resume, overwrite, protect)
    accelerator, precision, on_cpu = build_accelerator(tcfg.device, tcfg.precision)
    check_fsdp_run(accelerator, config.loss_weighting.strategy, WEIGHTINGS.get(config.loss_weighting.strategy),
                   tcfg.gradual_unfreezing is not None, config.analysis.affinity_every, resuming)
    if not accelerator.is_main_process:  # several processes (accelerate launch): the main one reports
        console = Console(quiet=True)
    torch.manual_seed(config.seed)
    loaded = build_backbone(config, tcfg.attention, on_cpu)
    model = build_model(config, tasks, loaded, plan.init_from if plan is not None else None)
    pack = build_packing(config, model)  # before compile and the move to a device: it probes the model on the CPU
    if tcfg.gradient_checkpointing:
        apply_gradient_checkpointing(model.backbone, model.adapters)
    active = plan.active if plan is not None else list(tasks)
    start = time.perf_counter()
    tokenize_all(prepared, loaded.tokenizer, tcfg.max_length)
    tokenize_s = time.perf_counter() - start
    weighting = WEIGHTINGS.get(config.loss_weighting.strategy)(list(tasks), config.loss_weighting)
    opt = build_optimization(model, weighting, config, sum(len(p.features["train"]) for p in prepared.values()),
                             accelerator.num_processes)
    if tcfg.compile:  # in place: module names, state-dict keys and hooks stay as they are
        model.architecture.token_model(model.backbone).compile(dynamic=True)
    # before prepare: FSDP replaces the parameters (the table finds the optimizer's by identity)
    table = parameter_table(opt.groups, model.backbone, opt.new_modules,
                            opt.unfreezer.unfreeze_steps() if opt.unfreezer else None)
    wrapped, optimizer = prepare(accelerator, model, opt.optimizer)
    weighting.to(accelerator.device)
    core = accelerator.unwrap_model(wrapped)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    evaluated = plan.seen if plan is not None else list(tasks)
    # every process draws the same global batch of num_processes x batch_size rows and trains on its share
    batchers, sampler, strategy = build_sampling(
        config, {n: p.features["train"] for n, p in prepared.items()}, tasks, active,
        [n for n in evaluated if n not in active], plan.replay if plan is not None else 0.0, pad_id,
        tcfg.batch_size * accelerator.num_processes, pack)
    trainable = trained_parameters(optimizer)
    # what the loss weighting needs from a step (all tasks, per-task gradients of the shared parameters, ...)
    multi = WeightedStep(weighting, sampler, wrapped, core, trainable, accelerator)
    run = Run(config=config, out=out, console=console, accelerator=accelerator, autocast=accelerator.autocast,
              core=core, tasks=tasks, prepared=prepared, active=active, evaluated=evaluated, weighting=weighting,
              multi=multi, optimizer=optimizer, scheduler=opt.scheduler, trainable=trainable, batchers=batchers,
              sampler=sampler, strategy=strategy, pad_id=pad_id, deployed_attention=loaded.deployed_attention,
              state=TrainerState(data_files=fingerprints(data_files(config)), max_steps=tcfg.max_steps,
                                 warmup_steps=opt.warmup_steps), running={n: [] for n in tasks},
              selection_metric=tcfg.early_stopping.metric if tcfg.early_stopping else "mean",
              step_offset=plan.step_offset if plan is not None else 0, staged=plan is not None,
              log=RunLog(out / "metrics.jsonl", accelerator.is_main_process))
    setup = Setup(precision, tokenize_s, loaded.vocab_report, table, opt.unfreezer,
                  find_checkpoint(run.checkpoint_dir("last")) if resuming else None, opt.word_embeddings)
    if setup.resume_from is not None:  # before anything is written: a checkpoint that does not load changes nothing
        restore(run, setup.resume_from, accept_changed_data)
    return run, setup


def restore(run: Run, found: Path, accept_changed_data: bool) -> None:
    """Continue from the checkpoint in ``found``: weights, optimizer, scheduler, random number generators, the
    trainer state and the sampler's and batchers' positions. Reads only.

    A run resumed with another ``training.max_steps`` than its checkpoint was trained for (``--resume --set
    training.max_steps=N`` extends a finished or interrupted run) gets its learning-rate schedule rebuilt for
    the new total, keeping its warmup (:func:`~multitune.training.setup.continue_schedule`), and
    ``run.max_steps_before`` records the old total (early stopping then lets a run it had stopped train on).

    Raises:
        MultituneError: a data file changed since the checkpoint (unless ``accept_changed_data``), or the
            checkpoint's trainer state is damaged.
    """
    inputs = run.state.data_files
    saved = load_checkpoint(found, run.core, run.weighting, run.optimizer, run.scheduler, restore_rng=True)
    if not accept_changed_data:
        check_unchanged(saved.get("data_files") if isinstance(saved, dict) else None, inputs, found)
    try:
        run.state, snapshots = TrainerState.from_state_dict(saved)
        run.sampler.load_state_dict(snapshots["sampler"])
        run.running = snapshots["running"]
        for n, b in run.batchers.items():
            b.load_state_dict(snapshots["batchers"][n])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise MultituneError(f"{found / STATE_FILE}: the checkpoint's trainer state is damaged or from another run "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); it cannot be resumed"
                             ) from None
    run.state.data_files = inputs  # (differs from the checkpoint's only with --accept-changed-data)
    tcfg, trained_for = run.config.training, run.state.max_steps
    run.scheduler, warmup = continue_schedule(run.scheduler, tcfg, run.state.step, trained_for,
                                              run.state.warmup_steps)
    if trained_for is not None and trained_for != tcfg.max_steps:
        run.max_steps_before = trained_for
    run.state.max_steps, run.state.warmup_steps = tcfg.max_steps, warmup
    run.resumed = True


def default_callbacks(run: Run, setup: Setup) -> list[Callback]:
    """The built-in callbacks of a run, in the order every event calls them. The order is the rule:

    - the trackers come first, so that they see every record of ``metrics.jsonl``;
    - on evaluation: model selection first (best value, early stopping), then per-task selection (its records
      go into the checkpoint), the sampler's feedback (the checkpoint holds the sampler as it is after it),
      logging, then the checkpoint, which sees all of the above, then the measure of what it wrote;
    - on a step's start: the sampler's schedule, then unfreezing; on its end: the affinity probe (its record
      precedes the step's train line), then logging.

    Raises:
        ConfigError: a tracker's package is missing, or the affinity analysis cannot run (before anything is
            written).
    """
    tcfg = run.config.training
    callbacks: list[Callback] = []
    if tcfg.report_to:
        callbacks.append(Trackers(run.config, run.out))
    callbacks += [ModelSelection(run.selection_metric, tcfg.early_stopping),
                  # per-task snapshots read the weights on the main process alone: not of a sharded model
                  PerTaskBest(run.checkpoint_dir(PER_TASK_DIR), run.core, run.trainable, run.tasks, run.active,
                              tcfg.per_task_best and not sharded(run.core), run.main_process, run.log),
                  SamplerSchedule(run.strategy)]
    if setup.unfreezer is not None:
        callbacks.append(Unfreezing(setup.unfreezer))
    callbacks += [AffinityProbe(run.config, run.multi, run.prepared, run.active, run.pad_id,
                                staged=run.staged),
                  MetricsLogger(tcfg.log_every), Checkpointer(), DiskUse(run.out)]
    if tcfg.compile:
        callbacks.append(StepTimer())
    return callbacks


def open_run_dir(run: Run, setup: Setup, resume: bool, overwrite: bool, plan: StagePlan | None,
                 protect: tuple[Path, ...]) -> None:
    """Everything is checked: report the run on the console and start writing its directory (under its lock):
    marker, config, parameter table; a resumed run drops the log lines of steps it trains again."""
    config, console, out = run.config, run.console, run.out
    for name, p in run.prepared.items():
        console.print(f"[bold]{name}[/] ({p.task.config.type}): "
                      + ", ".join(f"{s} {len(e)}" for s, e in p.data.splits.items()))
    if setup.vocab_report is not None:
        console.print(f"vocabulary: {setup.vocab_report['added']} domain words added "
                      f"({setup.vocab_report['vocab_size_before']} -> {setup.vocab_report['vocab_size_after']} "
                      f"tokens)")
    acc, tcfg = run.accelerator, config.training
    console.print(f"{run.core.architecture.type_name} backbone; tokenised every split once in {setup.tokenize_s:.1f}s; "
                  f"precision {setup.precision}{' (auto)' if tcfg.precision == 'auto' else ''}, "
                  f"attention {getattr(run.core.backbone.config, '_attn_implementation', None) or 'default'}, "
                  f"device {acc.device}"
                  + (f", {acc.num_processes} processes (global batch {tcfg.batch_size * acc.num_processes})"
                     if acc.num_processes > 1 else ""))
    # the padding that length grouping leaves; packed batches (training.packing) report theirs at the end
    active = [run.batchers[n] for n in run.active if run.batchers[n].pack is None]
    console.print(fast_path_summary(setup.precision, tcfg.precision, bf16_supported(acc.device),
                                    tcfg.group_by_length, padding_share(active, tcfg.group_by_length),
                                    padding_share(active, not tcfg.group_by_length), setup.word_embeddings,
                                    tcfg.unpadded),
                  markup=False, highlight=False)
    acc.wait_for_everyone()  # every process has checked the run directory before the main one writes
    if run.main_process:
        if plan is not None and plan.before_write is not None:
            plan.before_write()
        protected = (*protect, *data_files(config))
        lock_dir(out)  # one writer: a second process into the same directory stops here with one line
        # checked again under the lock: another process may have written the directory since the first check
        if check_output_dir(out, overwrite=overwrite, resume=resume, protected=protected) and overwrite \
                and not resume:
            clear_dir(out, protected)
        write_marker(out, "run")
        save_config(config, out / "config.yaml")
        write_json_atomic(out / "parameters.json", setup.parameters)
    print_parameter_table(console, setup.parameters)
    if run.resumed:
        discard_stale_checkpoints(run)
        if run.main_process:
            # lines logged after the checkpoint belong to steps trained again
            kept = [r for r in read_jsonl(out / "metrics.jsonl")
                    if isinstance(r.get("step", 0), int) and r.get("step", 0) <= run.state.step]
            write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        console.print(f"resumed from step {run.state.step}" + (
            "" if run.max_steps_before is None else
            f"; training.max_steps {run.max_steps_before} -> {tcfg.max_steps}: the learning-rate schedule "
            f"continues as one schedule over {tcfg.max_steps} steps"
            + (f" (its {run.state.warmup_steps} warmup steps kept)" if run.state.warmup_steps else "")
            + f", at lr {run.optimizer.param_groups[0]['lr']:.3g} now"))
    elif run.main_process:
        (out / "metrics.jsonl").unlink(missing_ok=True)


def discard_stale_checkpoints(run: Run) -> None:
    """Remove the copy of ``checkpoints/last`` and ``best`` that a run killed just after replacing them left
    (a resumed run may not write them again)."""
    if run.main_process:
        for directory in (run.checkpoint_dir("last"), run.checkpoint_dir("best")):
            discard_stale_copy(directory)


def _check_sampling(config: RunConfig, names: list[str]) -> None:
    """The sampling checks that need the run's tasks and loss weighting (before anything is read or written).

    Raises:
        ConfigError: e.g. ``sampling.reference.foo: unknown task; tasks: a, b``.
    """
    sampler = SAMPLERS.get(config.sampling.strategy, "sampling.strategy")
    sampler.check_config(config.sampling, names, "sampling")
    weighting = WEIGHTINGS.get(config.loss_weighting.strategy, "loss_weighting.strategy")
    if (sampler.needs_progress or sampler.needs_evaluations) and weighting.needs_all_tasks:
        raise ConfigError("sampling.strategy", f"{config.sampling.strategy} changes the task shares, but with "
                                               f"loss_weighting.strategy {config.loss_weighting.strategy} every step "
                                               f"holds one batch of each task; use a loss-level weighting (sum, "
                                               f"static, uncertainty, dwa) or another sampling strategy")
