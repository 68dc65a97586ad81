"""The training loop: micro-steps, the non-finite guard, clipping, the optimizer step and the evaluation trigger.
Everything else is a callback (:mod:`multitune.training.callbacks`) or a method of :class:`~multitune.training.run.Run`."""

from __future__ import annotations

import math
import time
from typing import Any

from multitune.errors import MultituneError
from multitune.training.checkpoint import find_checkpoint


def train_loop(run: Any) -> None:
    """Train until ``training.max_steps`` optimizer steps or until a callback sets ``run.should_stop``."""
    tcfg, state = run.config.training, run.state
    while state.step < tcfg.max_steps and not run.should_stop:
        started = time.perf_counter()
        run.callbacks.fire("on_step_start", run)
        losses, bad = accumulate(run, tcfg.gradient_accumulation_steps)
        if bad is None and not math.isfinite(run.finish_gradients(tcfg.max_grad_norm)):
            bad = ("+".join(losses), "non-finite gradient")  # the norm's check covers every gradient
        if bad is not None:  # the batches are consumed; optimizer, scheduler and step counter stay
            run.zero_grad()
            state.train_seconds += time.perf_counter() - started
            skip_step(run, *bad)
            continue
        run.optimizer_step()
        state.step, state.bad_in_a_row = state.step + 1, 0
        run.step_seconds = time.perf_counter() - started
        state.train_seconds += run.step_seconds  # callbacks (probes, logging, checkpoints) are not training time
        run.step_losses = losses
        run.callbacks.fire("on_step_end", run)
        if state.step % tcfg.eval_every == 0 or state.step == tcfg.max_steps:
            predictions: dict[str, list] = {}
            results = run.evaluate("validation", predictions)
            run.last_validation = (state.step, results, predictions)
            run.callbacks.fire("on_evaluate", run, results)


def accumulate(run: Any, micro_steps: int) -> tuple[dict[str, float], tuple[str, str] | None]:
    """Forward and backward ``micro_steps`` times; each part of a micro-step (the sampler's task, or every task
    when the loss weighting needs them all; one part per task for a gradient-level strategy) is one backward pass.

    Returns:
        ``(per-task loss values, None)``, or ``(..., (task, reason))`` when a loss was not finite on some process:
        the remaining batches are still drawn, so every process stays on the same batch stream.
    """
    losses: dict[str, float] = {}
    bad: tuple[str, str] | None = None
    run.begin_step()
    for _ in range(micro_steps):
        for part in run.parts():
            combined, values = run.forward(part)
            finite = all(map(math.isfinite, values.values())) and math.isfinite(float(combined.detach()))
            if bad is None and not run.all_processes(finite):
                name = next((n for n, v in values.items() if not math.isfinite(v)), part[0])
                bad = (name, f"non-finite loss ({values[name]})")
            if bad is None:
                run.backward(combined / micro_steps, values)
                losses.update(values)
    return losses, bad


def skip_step(run: Any, task: str, reason: str) -> None:
    """Count and report a step skipped for a non-finite loss or gradient.

    Raises:
        MultituneError: ``training.max_bad_steps`` steps in a row were skipped; the last checkpoint stays.
    """
    state, limit = run.state, run.config.training.max_bad_steps
    state.bad_steps[task] = state.bad_steps.get(task, 0) + 1
    state.bad_in_a_row += 1
    step = state.step + 1  # the step it tried to make (resume drops log lines past the checkpoint's step)
    run.log({"kind": "bad_step", "step": step, "task": task, "reason": reason})
    run.console.print(f"[yellow]warning:[/] step {step} skipped: {reason} in task {task} "
                      f"({state.bad_in_a_row} of at most {limit} in a row)")
    if state.bad_in_a_row >= limit:
        last = find_checkpoint(run.checkpoint_dir("last"))
        kept = f"the last good checkpoint stays in {last}" if last else "no checkpoint was written yet"
        raise MultituneError(f"training.max_bad_steps: stopped at step {step} after {limit} steps in a row with "
                             f"a non-finite loss or gradient (last: {reason} in task {task}); {kept} and no model "
                             f"was written; lower training.learning_rate or check the task's data")
