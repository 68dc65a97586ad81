"""The one training loop: every task, sampler and loss weighting goes through :func:`train`.

Order of work, so that bad input fails before anything is written or computed:
read + check all data -> load backbone -> tokenise once -> build model/optimizer -> loop -> restore best
-> save model -> final evaluation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from multitune.analysis.affinity import AffinityProbe, batches_drawn, write_transfer
from multitune.config.schema import RunConfig
from multitune.data.fingerprint import check_unchanged, data_files, fingerprints
from multitune.errors import ConfigError, MultituneError
from multitune.evaluation.evaluator import evaluate_task, selection_value
from multitune.fileio import discard_stale_copy, read_jsonl, write_json_atomic, write_text_atomic
from multitune.model import MultiTaskModel
from multitune.optim import (
    parameter_table,
)
from multitune.reporting.trackers import attach_trackers
from multitune.rundir import check_output_dir, clear_dir, lock_dir, lock_scope, write_marker
from multitune.sampling import SAMPLERS
from multitune.tasks import Task
from multitune.tasks.prepared import PreparedTask, build_tasks, read_task_data, tokenize_all
from multitune.training.checkpoint import (
    STATE_FILE,
    find_checkpoint,
    load_checkpoint,
    rng_states,
    save_checkpoint,
)
from multitune.training.distributed import all_processes, average_gradients, shard_batch
from multitune.training.finish import (
    adapter_summary,
    build_results,
    calibrate,
    compile_seconds,
    plot_safely,
    save_model,
    train_summary,
)
from multitune.training.multistep import WeightedStep
from multitune.training.per_task import PER_TASK_DIR, PerTaskBest
from multitune.training.progress import TrainingProgress, print_parameter_table, print_results_table
from multitune.training.run_dir import CHECKPOINTS, check_run_dir
from multitune.training.runlog import RunLog
from multitune.training.setup import (
    build_accelerator,
    build_backbone,
    build_model,
    build_optimization,
    build_sampling,
)
from multitune.training.state import TrainerState
from multitune.weighting import WEIGHTINGS


@dataclass
class StagePlan:
    """What one stage of sequential training does (see :mod:`multitune.training.stages`).

    Attributes:
        active: tasks trained in the stage.
        seen: tasks evaluated (this and earlier stages).
        replay: share of batches from ``seen`` tasks that are not ``active``.
        init_from: model directory of the previous stage (backbone and every head start from it).
        before_write: called once the stage has passed every check, before it writes anything (the
            sequential run prepares its own directory then, so a run that fails validation writes nothing).
    """

    active: list[str]
    seen: list[str]
    replay: float = 0.0
    init_from: Path | None = None
    before_write: Any = None


def train(config: RunConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None,
          progress: bool = True, plan: StagePlan | None = None, on_evaluate: Any = None,
          accept_changed_data: bool = False, protect: tuple[Path, ...] = ()) -> dict:
    """Train one multi-task model as ``config`` says and write the run directory.

    Args:
        config: a validated config (see :func:`multitune.config.load_config`).
        resume: continue from ``output_dir/checkpoints/last`` (starts afresh when there is none).
        overwrite: replace a non-empty ``output_dir``.
        console: where progress and tables go (default: stderr).
        progress: show a live progress bar.
        on_evaluate: called after each validation evaluation (after its checkpoint) with keywords ``step``,
            ``results`` (task -> metrics), ``tasks`` and ``model``; what it raises ends the run (a search
            prunes a trial so). Not called by staged or AdapterFusion runs.
        accept_changed_data: resume even when a data file differs from the one the checkpoint was trained on.
        protect: more paths ``--overwrite`` must never clear (e.g. the config file); the run's data files,
            the current and home directories and filesystem roots are always protected.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError, DataError, MultituneError: bad config, data or run directory; nothing is written then.
            The run directory is locked while the run writes it: a second process gets a one-line error.
    """
    with lock_scope():
        return _train(config, resume, overwrite, console or Console(stderr=True), progress, plan, on_evaluate,
                      accept_changed_data, tuple(protect))


def _train(config: RunConfig, resume: bool, overwrite: bool, console: Console, progress: bool,
           plan: StagePlan | None, on_evaluate: Any, accept_changed_data: bool, protect: tuple[Path, ...]) -> dict:
    if config.adapters is not None and config.adapters.arrangement == "fusion" and plan is None:
        from multitune.training.stages import train_fusion

        return train_fusion(config, resume=resume, overwrite=overwrite, console=console, progress=progress,
                            accept_changed_data=accept_changed_data, protect=protect)
    if config.stages and plan is None:
        from multitune.training.stages import train_stages

        return train_stages(config, resume=resume, overwrite=overwrite, console=console, progress=progress,
                            accept_changed_data=accept_changed_data, protect=protect)
    tcfg = config.training
    out = Path(config.output_dir)
    tasks = build_tasks(config)
    _check_sampling(config, list(tasks))
    prepared = read_task_data(config, tasks)
    resuming = check_run_dir(config, out, resume, overwrite, protect)
    inputs = fingerprints(data_files(config))  # recorded in every checkpoint; resume compares them

    accelerator, precision, on_cpu = build_accelerator(tcfg.device, tcfg.precision)
    if not accelerator.is_main_process:  # several processes (accelerate launch): the main one reports
        console, progress = Console(quiet=True), False
    torch.manual_seed(config.seed)
    loaded = build_backbone(config, tcfg.attention, on_cpu)
    backbone, tokenizer, deployed_attention = loaded.model, loaded.tokenizer, loaded.deployed_attention
    model = build_model(config, tasks, loaded, plan.init_from if plan is not None else None)
    active = plan.active if plan is not None else list(tasks)
    evaluated = plan.seen if plan is not None else list(tasks)
    start = time.perf_counter()
    tokenize_all(prepared, tokenizer, tcfg.max_length)
    tokenize_s = time.perf_counter() - start
    names = list(tasks)
    weighting = WEIGHTINGS.get(config.loss_weighting.strategy)(names, config.loss_weighting)
    opt = build_optimization(model, weighting, config, sum(len(p.features["train"]) for p in prepared.values()),
                             accelerator.num_processes)
    groups, optimizer, scheduler, unfreezer = opt.groups, opt.optimizer, opt.scheduler, opt.unfreezer
    if tcfg.compile:  # in place: module names, state-dict keys and hooks stay as they are
        model.architecture.token_model(model.backbone).compile(dynamic=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    weighting.to(accelerator.device)
    core: MultiTaskModel = accelerator.unwrap_model(model)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # every process draws the same global batch of num_processes x batch_size rows and trains on its share
    global_batch = tcfg.batch_size * accelerator.num_processes
    batchers, sampler, task_sampler = build_sampling(
        config, {n: p.features["train"] for n, p in prepared.items()}, tasks, active,
        [n for n in evaluated if n not in active], plan.replay if plan is not None else 0.0, pad_id, global_batch)
    # what the loss weighting needs from a step (all tasks, per-task gradients of the shared parameters, ...)
    multi = WeightedStep(weighting, sampler, model, core, [p for g in groups for p in g["params"]], accelerator)
    probe = AffinityProbe(config, multi, prepared, active, pad_id, staged=plan is not None)  # transfer analysis
    state = TrainerState(data_files=inputs)

    ckpt_last, ckpt_best = out / CHECKPOINTS / "last", out / CHECKPOINTS / "best"
    running: dict[str, list[float]] = {n: [] for n in names}  # train losses since the last log line
    if resuming:  # before anything is written: a checkpoint that does not load leaves the run as it was
        found = find_checkpoint(ckpt_last)
        saved = load_checkpoint(found, core, weighting, optimizer, scheduler, restore_rng=True)
        if not accept_changed_data:
            check_unchanged(saved.get("data_files") if isinstance(saved, dict) else None, inputs, found)
        try:
            state, snapshots = TrainerState.from_state_dict(saved)
            sampler.load_state_dict(snapshots["sampler"])
            running = snapshots["running"]
            for n, b in batchers.items():
                b.load_state_dict(snapshots["batchers"][n])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise MultituneError(f"{found / STATE_FILE}: the checkpoint's trainer state is damaged or from "
                                 f"another run ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); it "
                                 f"cannot be resumed") from None
        state.data_files = inputs  # (differs from the checkpoint's only with --accept-changed-data)
        if accelerator.is_main_process:  # a run killed just after replacing a checkpoint may not write it again
            for directory in (ckpt_last, ckpt_best):
                discard_stale_copy(directory)

    # everything is checked: from here on the run writes into its directory and reports on the console
    for name, p in prepared.items():
        counts = ", ".join(f"{s} {len(e)}" for s, e in p.data.splits.items())
        console.print(f"[bold]{name}[/] ({p.task.config.type}): {counts}")
    if loaded.vocab_report is not None:
        console.print(f"vocabulary: {loaded.vocab_report['added']} domain words added "
                      f"({loaded.vocab_report['vocab_size_before']} -> {loaded.vocab_report['vocab_size_after']} tokens)")
    console.print(f"{core.architecture.type_name} backbone; tokenised every split once in {tokenize_s:.1f}s; "
                  f"precision {precision}{' (auto)' if tcfg.precision == 'auto' else ''}, "
                  f"attention {getattr(backbone.config, '_attn_implementation', None) or 'default'}, "
                  f"device {accelerator.device}"
                  + (f", {accelerator.num_processes} processes (global batch {global_batch})"
                     if accelerator.num_processes > 1 else ""))
    accelerator.wait_for_everyone()  # every process has checked the run directory before the main one writes
    log = RunLog(out / "metrics.jsonl", accelerator.is_main_process)
    attach_trackers(log, config, out)  # training.report_to: TensorBoard / MLflow get every record too
    from multitune.config.loader import save_config

    table = parameter_table(groups, core.backbone, opt.new_modules, unfreezer.unfreeze_steps() if unfreezer else None)
    if accelerator.is_main_process:
        if plan is not None and plan.before_write is not None:
            plan.before_write()
        lock_dir(out)  # one writer: a second process into the same directory stops here with one line
        # checked again under the lock: another process may have written the directory since the first check
        if check_output_dir(out, overwrite=overwrite, resume=resume, protected=(*protect, *data_files(config))) \
                and overwrite and not resume:
            clear_dir(out, (*protect, *data_files(config)))
        write_marker(out, "run")
        save_config(config, out / "config.yaml")
        write_json_atomic(out / "parameters.json", table)
    print_parameter_table(console, table)
    if resuming:
        if accelerator.is_main_process:  # lines logged after the checkpoint belong to steps trained again
            kept = [r for r in read_jsonl(out / "metrics.jsonl")
                    if isinstance(r.get("step", 0), int) and r.get("step", 0) <= state.step]
            write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        if unfreezer is not None:
            unfreezer.update(state.step)
        console.print(f"resumed from step {state.step}")
    elif accelerator.is_main_process:
        (out / "metrics.jsonl").unlink(missing_ok=True)

    autocast = accelerator.autocast
    es = tcfg.early_stopping
    metric_name = es.metric if es else "mean"
    eval_bs = tcfg.eval_batch_size or 2 * tcfg.batch_size

    trained_attention = getattr(core.backbone.config, "_attn_implementation", None)

    def evaluate_all(split: str, predictions: dict[str, list] | None = None) -> dict[str, dict[str, float]]:
        results = {}
        switch = deployed_attention is not None and trained_attention != deployed_attention
        if switch:
            core.backbone.set_attn_implementation(deployed_attention)
        try:
            for n, p in prepared.items():
                if split in p.features and n in evaluated:
                    results[n], preds = evaluate_task(core, p.task, p.features[split], p.data.splits[split],
                                                      eval_bs, pad_id, autocast)
                    if predictions is not None:
                        predictions[n] = preds
        finally:
            if switch:
                core.backbone.set_attn_implementation(trained_attention)
        return results

    def snapshot() -> dict:
        return state.state_dict(sampler=sampler.state_dict(), running=running,
                                batchers={n: b.state_dict() for n, b in batchers.items()})

    trainable = [p for g in groups for p in g["params"]]
    per_task = PerTaskBest(out / CHECKPOINTS / PER_TASK_DIR, core, trainable, tasks, active, tcfg.per_task_best,
                           accelerator.is_main_process, log)
    per_task.start(state.per_task_best, resuming)  # each task's own best step, and its weights (training.per_task_best)
    model.train()
    bar = TrainingProgress(console, tcfg.max_steps, enabled=progress)
    bar.start(state.step)
    stopped_early = False
    first_step_s, steps_before = None, state.step  # with training.compile, this process's first step compiles
    try:
        while state.step < tcfg.max_steps:
            t0 = time.perf_counter()
            if task_sampler.needs_progress:  # e.g. temperature annealing: the step of the coming draws
                task_sampler.set_progress(state.step, tcfg.max_steps)
            if unfreezer is not None:
                opened = unfreezer.update(state.step)
                if opened and accelerator.is_main_process:
                    log({"kind": "unfreeze", "step": state.step,
                                                         "groups_open": opened})
            step_losses: dict[str, float] = {}
            bad: tuple[str, str] | None = None  # (task, reason): the step is skipped
            multi.begin()
            for _ in range(tcfg.gradient_accumulation_steps):
                # the sampler's task, or every task if the loss weighting needs them all; one backward pass
                # for the part's tasks (a gradient-level strategy makes one part per task)
                for part in multi.parts():
                    losses: dict[str, torch.Tensor] = {}
                    for name in part:
                        batch = batchers[name].next_batch()
                        state.examples += len(batch["input_ids"])
                        state.real_tokens += int(batch["attention_mask"].sum())
                        state.padded_tokens += batch["attention_mask"].numel()
                        shard = shard_batch(batch, accelerator.process_index, accelerator.num_processes)
                        batch = {k: v.to(accelerator.device) for k, v in shard.items()}
                        with autocast():
                            losses[name] = multi.module(name, batch).loss  # the DDP model, or the plain one
                        multi.keep(name, batch)
                    combined, _ = multi.weigh(losses)  # the weights are logged from the weighting itself
                    values = {n: float(loss.detach()) for n, loss in losses.items()}
                    finite = all(map(math.isfinite, values.values())) and math.isfinite(float(combined.detach()))
                    if bad is None and not all_processes(finite, accelerator):  # processes skip a step together
                        name = next((n for n, v in values.items() if not math.isfinite(v)), part[0])
                        bad = (name, f"non-finite loss ({values[name]})")
                    if bad is None:
                        multi.backward(combined / tcfg.gradient_accumulation_steps, values)
                        step_losses.update(values)
            if bad is None:
                average_gradients(weighting, accelerator)  # learned loss weights live outside DDP
                multi.combine()  # a gradient-level strategy turns per-task gradients into the shared ones
                # clipping computes the total norm anyway (max_norm inf when clipping is off: nothing is scaled);
                # one finiteness check on it covers every gradient
                norm = accelerator.clip_grad_norm_(trainable, tcfg.max_grad_norm or math.inf)
                if not math.isfinite(float(norm)):
                    bad = ("+".join(step_losses), "non-finite gradient")
            if bad is not None:
                optimizer.zero_grad(set_to_none=True)
                state.train_seconds += time.perf_counter() - t0
                _skip_step(state, bad, tcfg.max_bad_steps, out, console, accelerator.is_main_process, log)
                continue
            state.bad_in_a_row = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            multi.after_step(autocast)  # the loss weighting updates its state (e.g. loss histories)
            t0 += probe.after_step(state.step + 1, optimizer, autocast, log)  # not counted as training time
            state.step += 1
            state.train_seconds += time.perf_counter() - t0
            if first_step_s is None:
                first_step_s, steps_before = time.perf_counter() - t0, state.step - 1
            for n, v in step_losses.items():
                running[n].append(v)
            bar.update(state.step, {n: sum(v[-20:]) / len(v[-20:]) for n, v in running.items() if v})
            step = state.step
            if step % tcfg.log_every == 0 and accelerator.is_main_process:
                log({"kind": "train", "step": step, "lr": scheduler.get_last_lr()[0],
                                                     "loss": {n: sum(v) / len(v) for n, v in running.items() if v},
                                                     "loss_weights": weighting.weights(),
                                                     **({"grad_stats": weighting.stats} if weighting.stats else {}),
                                                     **({"sampling": multi.shares()}
                                                        if task_sampler.shares_change else {})})
                running = {n: [] for n in names}
            if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
                results = evaluate_all("validation")
                value = selection_value(metric_name, {n: r for n, r in results.items() if n in active}, tasks)
                improved = state.best_value is None or value > state.best_value + (es.min_delta if es else 0)
                if improved:
                    state.best_value, state.best_step, state.bad_evals = value, step, 0
                else:
                    state.bad_evals += 1
                per_task.update(state.per_task_best, step, results)  # before the checkpoint, which records it
                # before the checkpoint, so that it holds the sampler as it is after this evaluation
                _observe_sampling(task_sampler, step, results, tasks, log, accelerator.is_main_process)
                if accelerator.is_main_process:
                    log({
                        "kind": "eval", "step": step, "split": "validation", "metrics": results,
                        "selection": {"metric": metric_name, "value": value, "best": state.best_value,
                                      "best_step": state.best_step},
                        "loss_weights": weighting.weights(), "sampling": multi.shares(),
                        "epochs": {n: round(b.epochs_done, 3) for n, b in batchers.items()},
                        "elapsed_s": round(state.train_seconds, 2)})
                    bar.log_eval(step, results, value, improved)
                    rng = rng_states()  # checkpointing must not disturb the training RNG stream
                    if improved:
                        save_checkpoint(ckpt_best, core, weighting, optimizer, scheduler, snapshot())
                    save_checkpoint(ckpt_last, core, weighting, optimizer, scheduler, snapshot())
                    torch.set_rng_state(rng["torch"])
                if on_evaluate is not None:
                    on_evaluate(step=step, results=results, tasks=tasks, model=core)
                if es and state.bad_evals >= es.patience:
                    console.print(f"early stopping at step {step}: {metric_name} has not improved for "
                                  f"{es.patience} evaluations (best {state.best_value:.4f} at step "
                                  f"{state.best_step})")
                    stopped_early = True
                    break
    finally:
        bar.stop()

    accelerator.wait_for_everyone()
    best = find_checkpoint(ckpt_best)
    if best is not None:
        load_checkpoint(best, core)
    # tasks that tune decision thresholds on validation do it now, on the restored best model
    val_predictions: dict[str, list] = {}
    evaluate_all("validation", val_predictions)
    calibrated = calibrate(tasks, active, val_predictions, {n: p.data.splits["validation"] for n, p in prepared.items()
                                                            if "validation" in p.data.splits})
    if calibrated and accelerator.is_main_process:
        log({"kind": "calibrate", "step": state.step, "tasks": calibrated})
    val_predictions = {}
    if core.adapters is not None:
        core.adapters.fusion_attention(reset=True)  # measured on the final validation pass only
    validation = evaluate_all("validation", val_predictions)
    fusion_attention = core.adapters.fusion_attention() if core.adapters is not None else {}
    test = evaluate_all("test") if any("test" in p.features for p in prepared.values()) else None
    train_info = train_summary(state, stopped_early, metric_name, tokenize_s, precision,
                               getattr(core.backbone.config, "_attn_implementation", None), str(accelerator.device),
                               {n: batches_drawn(b) for n, b in batchers.items()},
                               compile_seconds(first_step_s, steps_before, state) if tcfg.compile else None)
    results = build_results(validation, test, calibrated, train_info, {n: p.data.report for n, p in prepared.items()},
                            {n: p.task for n, p in prepared.items()}, loaded.vocab_report,
                            adapter_summary(core, config, fusion_attention))
    if accelerator.is_main_process:
        save_model(core, out, config, results, state.step)
        write_transfer(out, results)  # the mean affinity matrices (results["transfer"]) and affinity.png
        write_json_atomic(out / "results.json", results)
        plot_safely(console, lambda: _plot(out), lambda: _plot_confusions(out, prepared, val_predictions))
        print_results_table(console, results, tasks)
    log.close()
    return results


def _skip_step(state: TrainerState, bad: tuple[str, str], max_bad_steps: int, out: Path, console: Console,
               main_process: bool, log: RunLog) -> None:
    """Count and report a step skipped for a non-finite loss or gradient (its batches are consumed; the
    optimizer, the scheduler and the step counter do not move).

    Raises:
        MultituneError: ``max_bad_steps`` steps in a row were skipped; the last checkpoint is left as it is.
    """
    task, reason = bad
    state.bad_steps[task] = state.bad_steps.get(task, 0) + 1
    state.bad_in_a_row += 1
    step = state.step + 1  # the step it tried to make (resume drops log lines past the checkpoint's step)
    if main_process:
        log({"kind": "bad_step", "step": step, "task": task, "reason": reason})
    console.print(f"[yellow]warning:[/] step {step} skipped: {reason} in task {task} "
                  f"({state.bad_in_a_row} of at most {max_bad_steps} in a row)")
    if state.bad_in_a_row >= max_bad_steps:
        last = find_checkpoint(out / CHECKPOINTS / "last")
        kept = f"the last good checkpoint stays in {last}" if last else "no checkpoint was written yet"
        raise MultituneError(f"training.max_bad_steps: stopped at step {step} after {max_bad_steps} steps in a row "
                             f"with a non-finite loss or gradient (last: {reason} in task {task}); {kept} and no "
                             f"model was written; lower training.learning_rate or check the task's data")


def _plot(out: Path) -> None:
    from multitune.evaluation.plots import plot_learning_curves, plot_sampling_shares

    try:
        plot_learning_curves(read_jsonl(out / "metrics.jsonl"), out / "learning_curves.png")
        plot_sampling_shares(read_jsonl(out / "metrics.jsonl"), out / "sampling_shares.png")
    except ImportError:  # matplotlib is a dependency, but a broken install must not lose a finished run
        pass


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


def _observe_sampling(sampler: Any, step: int, results: dict[str, dict[str, float]], tasks: dict[str, Task],
                      log: RunLog, main_process: bool) -> None:
    """Hand a validation evaluation to a sampler that adapts to it; log the change of shares it makes."""
    if not sampler.needs_evaluations:
        return
    change = sampler.observe(step, results, tasks)
    if change is not None and main_process:
        log({"kind": "sampling", "step": step, **change})


def _plot_confusions(out: Path, prepared: dict[str, PreparedTask], predictions: dict[str, list]) -> None:
    """``confusion_<task>.png`` for every task that has a confusion matrix (classification), on validation."""
    try:
        from multitune.evaluation.confusion import plot_confusion_matrix
    except ImportError:
        return
    for name, preds in predictions.items():
        p = prepared[name]
        matrix = p.task.confusion(preds, p.data.splits["validation"])
        if matrix is not None:
            labels, counts = matrix
            plot_confusion_matrix(labels, counts, out / f"confusion_{name}.png", f"{name}: validation")
