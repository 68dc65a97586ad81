"""Callbacks: everything that watches or steers a training run, called at named events of the loop.

The loop (:mod:`multitune.training.loop`) only trains; model selection, early stopping, the task sampler's
schedule, gradual unfreezing, logging, checkpoints (and the measure of what they write), per-task selection,
the affinity probe, the experiment trackers and user code are callbacks. Each event is called on every
callback in one order, the list built by :func:`multitune.training.trainer.default_callbacks` (its ordering
rules are written next to it); a user's callbacks come after the built-in ones.

Events (each gets the :class:`~multitune.training.run.Run`; ``run.state`` holds the counters):

- ``on_run_start(run)``: everything is built and checked, the run directory is ready (and a resumed run's
  state restored); nothing has trained yet.
- ``on_step_start(run)``: before the batches of the next optimizer step are drawn.
- ``on_step_end(run)``: after an optimizer step (``run.state.step`` counts it; ``run.step_losses`` holds its
  per-task losses). A step skipped for a non-finite loss or gradient has no ``on_step_end``.
- ``on_evaluate(run, results)``: after a validation evaluation (task -> metrics) of the tasks the run
  evaluates. ``run.selection_value`` is the value that picks the best checkpoint; ``run.improved`` says whether
  it improved.
- ``on_save(run, directory)``: a checkpoint is about to be written to ``directory`` (its content is fixed:
  raising here leaves the previous checkpoint in place).
- ``on_run_end(run, results)``: the run is finished and ``results`` (the content of ``results.json``) built,
  before it is written; a callback may add keys.

Whatever a callback raises ends the run with that error (a search prunes a trial so). Setting
``run.should_stop = True`` ends the loop after the current event, as early stopping does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from multitune.evaluation.evaluator import selection_value
from multitune.fileio import files_on_disk
from multitune.training.checkpoint import rng_states, save_checkpoint
from multitune.training.distributed import full_state_dict
from multitune.training.run_dir import CHECKPOINTS
from multitune.training.state import TrainerState

if TYPE_CHECKING:
    from multitune.training.run import Run

EVENTS = ("on_run_start", "on_step_start", "on_step_end", "on_evaluate", "on_save", "on_run_end")


class Callback:
    """Base class of callbacks: every event does nothing; override the ones you need.

    Example (a metric logger)::

        class PrintAccuracy(multitune.Callback):
            def on_evaluate(self, run, results):
                print(run.state.step, results["sentiment"]["accuracy"])

        multitune.train(config, callbacks=[PrintAccuracy()])
    """

    def on_run_start(self, run: Run) -> None:
        """The run is built and its directory ready; nothing has trained yet."""

    def on_step_start(self, run: Run) -> None:
        """Before the next optimizer step draws its batches."""

    def on_step_end(self, run: Run) -> None:
        """After an optimizer step (``run.state.step`` counts it)."""

    def on_evaluate(self, run: Run, results: dict[str, dict[str, float]]) -> None:
        """After a validation evaluation: ``results`` maps task -> metric -> value."""

    def on_save(self, run: Run, directory: Path) -> None:
        """Before a checkpoint is written to ``directory``."""

    def on_run_end(self, run: Run, results: dict) -> None:
        """The run's ``results`` are built (before ``results.json`` is written)."""


class Callbacks:
    """An ordered list of callbacks; ``fire(event, run, ...)`` calls the event on each, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            missing = [e for e in EVENTS if not callable(getattr(cb, e, None))]
            if missing:
                raise TypeError(f"callback {type(cb).__name__} has no {', '.join(missing)} (subclass "
                                f"multitune.Callback)")

    def fire(self, event: str, run: Run, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(run, *args)

    def __iter__(self):
        return iter(self.callbacks)


class ModelSelection(Callback):
    """The selection metric after each evaluation: best value and step, and early stopping
    (``training.early_stopping``: stop after ``patience`` evaluations without an improvement of ``min_delta``).

    A resumed run that early stopping had stopped (finished, or killed before it finished) finishes without
    training, unless it was resumed with another ``training.max_steps`` (``--resume --set
    training.max_steps=N`` to extend it): then it trains on, with the patience counter reset and the best value
    kept (an evaluation must still beat it to count as an improvement)."""

    def __init__(self, metric: str, early_stopping: Any):
        self.metric, self.es = metric, early_stopping

    def on_run_start(self, run: Run) -> None:
        state = run.state
        if not (run.resumed and self.es and state.bad_evals >= self.es.patience):
            return
        max_steps = run.config.training.max_steps
        if run.max_steps_before is not None and max_steps > state.step:
            run.console.print(f"early stopping had stopped the run at step {state.step}; with training.max_steps "
                              f"{run.max_steps_before} -> {max_steps} it trains on, its patience counter reset "
                              f"(best {self.metric} {state.best_value:.4f} at step {state.best_step})")
            state.bad_evals = 0
        else:
            run.should_stop = run.stopped_early = True

    def on_evaluate(self, run: Run, results: dict[str, dict[str, float]]) -> None:
        state = run.state
        value = selection_value(self.metric, {n: r for n, r in results.items() if n in run.active}, run.tasks)
        run.selection_value = value
        run.improved = state.best_value is None or value > state.best_value + (self.es.min_delta if self.es else 0)
        if run.improved:
            state.best_value, state.best_step, state.bad_evals = value, state.step, 0
        else:
            state.bad_evals += 1
        if self.es and state.bad_evals >= self.es.patience:
            run.console.print(f"early stopping at step {state.step}: {self.metric} has not improved for "
                              f"{self.es.patience} evaluations (best {state.best_value:.4f} at step "
                              f"{state.best_step})")
            run.should_stop = run.stopped_early = True


class SamplerSchedule(Callback):
    """Tells the task sampler the step of the coming draws (e.g. temperature annealing) and hands it each
    validation evaluation when it adapts to them; logs the change of shares it makes."""

    def __init__(self, strategy: Any):
        self.strategy = strategy

    def on_step_start(self, run: Run) -> None:
        if self.strategy.needs_progress:
            self.strategy.set_progress(run.state.step, run.config.training.max_steps)

    def on_evaluate(self, run: Run, results: dict[str, dict[str, float]]) -> None:
        if self.strategy.needs_evaluations:
            change = self.strategy.observe(run.state.step, results, run.tasks)
            if change is not None:
                run.log({"kind": "sampling", "step": run.state.step, **change})


class Unfreezing(Callback):
    """Gradual unfreezing (``training.gradual_unfreezing``): opens backbone layer groups at their steps."""

    def __init__(self, unfreezer: Any):
        self.unfreezer = unfreezer

    def on_run_start(self, run: Run) -> None:
        if run.resumed:
            self.unfreezer.update(run.state.step)

    def on_step_start(self, run: Run) -> None:
        opened = self.unfreezer.update(run.state.step)
        if opened:
            run.log({"kind": "unfreeze", "step": run.state.step, "groups_open": opened})


class MetricsLogger(Callback):
    """The progress bar and ``metrics.jsonl``: train lines every ``training.log_every`` steps (mean losses since
    the last line, learning rate, loss weights, sampling shares) and one eval line per evaluation. Without a live
    bar (``--no-progress``, or a console that is not a terminal) the console gets the same every
    ``log_every`` steps as one plain line, ``step 20/100: loss sentiment=0.6931 ner=1.2040 | lr 0.0009``."""

    def __init__(self, log_every: int):
        self.log_every = log_every

    def on_step_end(self, run: Run) -> None:
        for n, v in run.step_losses.items():
            run.running[n].append(v)
        run.bar.update(run.state.step, {n: sum(v[-20:]) / len(v[-20:]) for n, v in run.running.items() if v})
        if run.state.step % self.log_every == 0:
            weighting, lr = run.weighting, run.scheduler.get_last_lr()[0]
            losses = {n: sum(v) / len(v) for n, v in run.running.items() if v}
            run.log({"kind": "train", "step": run.state.step, "lr": lr, "loss": losses,
                     "loss_weights": weighting.weights(),
                     **({"grad_stats": weighting.stats} if weighting.stats else {}),
                     **({"sampling": run.multi.shares()} if run.strategy.shares_change else {})})
            run.bar.log_losses(run.state.step, losses, lr)  # a plain line when there is no live bar
            run.running = {n: [] for n in run.running}

    def on_evaluate(self, run: Run, results: dict[str, dict[str, float]]) -> None:
        state = run.state
        run.log({"kind": "eval", "step": state.step, "split": "validation", "metrics": results,
                 "selection": {"metric": run.selection_metric, "value": run.selection_value,
                               "best": state.best_value, "best_step": state.best_step},
                 "loss_weights": run.weighting.weights(), "sampling": run.multi.shares(),
                 "epochs": {n: round(b.epochs_done, 3) for n, b in run.batchers.items()},
                 "elapsed_s": round(state.train_seconds, 2)})
        run.bar.log_eval(state.step, results, run.selection_value, run.improved)


class Checkpointer(Callback):
    """After each evaluation, on the main process: ``checkpoints/best`` when the selection metric improved
    (the weights, loss weighting and trainer state: restoring the best model needs nothing else), then
    ``checkpoints/last`` (all of that, plus optimizer, scheduler and random states, for ``--resume``), which
    links the files it shares with a ``best`` of the same step. Checkpointing does not disturb the training
    random number stream."""

    def on_evaluate(self, run: Run, results: dict[str, dict[str, float]]) -> None:
        weights = full_state_dict(run.core)  # FSDP: every process takes part in gathering them (else None)
        if not run.main_process:
            return
        rng = rng_states()
        state = run.snapshot()
        best = run.checkpoint_dir("best") if run.improved else None
        if best is not None:
            run.callbacks.fire("on_save", run, best)
            with run.timing_writes():
                save_checkpoint(best, run.core, run.weighting, None, None, state, weights=weights)
        last = run.checkpoint_dir("last")
        run.callbacks.fire("on_save", run, last)
        # a sharded run's optimizer state is not written: the main process holds only its shard (no resume)
        optimizer = run.optimizer if weights is None else None
        with run.timing_writes():
            save_checkpoint(last, run.core, run.weighting, optimizer, run.scheduler, state, same_as=best,
                            weights=weights)
        torch.set_rng_state(rng["torch"])


class DiskUse(Callback):
    """What the run wrote, measured on disk (never estimated), for ``results.json``'s ``train``:

    - ``bytes_written``: the files this run put in its directory, each counted once however many names (hard
      links) it has, including checkpoints it replaced later (counted after each evaluation's checkpoints and
      once the model is written; ``results.json`` and the plots, written after that, are left out);
    - ``disk_bytes``: what the run directory holds at that moment, each file once (``du`` without
      ``--count-links``, in bytes rather than blocks);
    - ``write_s``: the time spent writing checkpoints, per-task snapshots and the model;
    - ``process_s``: the wall time of the whole process so far (the ``multitune train`` command from its start,
      to compare with the training time ``wall_s``; None where the operating system does not tell).

    A resumed run counts what its own process wrote (files older than its start are an earlier process's).
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        # (file modification times come from a clock that may lag a tick behind time.time_ns)
        self.since_ns = time.time_ns() - 50_000_000
        self.written: dict[tuple[int, int, int], int] = {}

    def count(self, root: Path) -> dict[tuple[int, int, int], int]:
        """Add the files below ``root`` that this run wrote; return every file below it."""
        found = files_on_disk(root)
        self.written.update({key: size for key, size in found.items() if key[2] >= self.since_ns})
        return found

    def on_evaluate(self, run: Run, results: dict[str, dict[str, float]]) -> None:
        if run.main_process:  # checkpoint files are never changed once written: each is counted once
            self.count(self.out / CHECKPOINTS)

    def on_run_end(self, run: Run, results: dict) -> None:
        if not run.main_process:
            return
        found = self.count(self.out)
        results["train"].update({"bytes_written": sum(self.written.values()), "disk_bytes": sum(found.values()),
                                 "write_s": round(run.write_seconds, 2), "process_s": process_seconds()})


def process_seconds() -> float | None:
    """Wall time since this process started (Linux: from ``/proc``), or None where it cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return round(max(uptime - started, 0.0), 2)


class EvaluateHook(Callback):
    """A plain function called after each evaluation with keywords ``step`` (counted over the stages of a
    staged run), ``results``, ``tasks`` and ``model``: the ``on_evaluate=`` argument of
    :func:`multitune.training.train`."""

    def __init__(self, function: Callable[..., Any]):
        self.function = function

    def on_evaluate(self, run: Run, results: dict[str, dict[str, float]]) -> None:
        self.function(step=run.step_offset + run.state.step, results=results, tasks=run.tasks, model=run.core)


class StepTimer(Callback):
    """With ``training.compile``: the time of this process's first step (the one that compiles), for
    ``results.json``'s ``train.compile_s``."""

    def __init__(self):
        self.first_step_s: float | None = None
        self.steps_before = 0

    def on_step_end(self, run: Run) -> None:
        if self.first_step_s is None:
            self.first_step_s, self.steps_before = run.step_seconds, run.state.step - 1

    def on_run_end(self, run: Run, results: dict) -> None:
        seconds = compile_seconds(self.first_step_s, self.steps_before, run.state)
        if seconds is not None:
            results["train"]["compile_s"] = seconds


def compile_seconds(first_step_s: float | None, steps_before: int, state: TrainerState) -> float | None:
    """The one-off cost of ``training.compile``: how much longer this process's first step (which compiles)
    took than its average later step; None when it made fewer than two steps."""
    made = state.step - steps_before
    if first_step_s is None or made < 2:
        return None
    # (a resumed run's counter also holds the time of earlier processes' steps: their average stands in)
    others = max(state.train_seconds - first_step_s, 0.0) / (state.step - 1)
    return round(max(first_step_s - others, 0.0), 2)
