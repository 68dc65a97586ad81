"""What a run is made of, driven from one place: :func:`train` runs a single run, or a plan of single runs.

A run with ``stages``, or with an adapter arrangement that trains in stages (AdapterFusion: one adapter per
task, then fusion layers over them), is a list of :class:`Stage`: each a complete single run of
:func:`multitune.training.trainer.train_run` in ``RUN/stages/NN-name/``, starting from the previous stage's
model. After every stage each task seen so far is evaluated; at the end the forgetting matrix is written
(:mod:`multitune.training.stages`) and the last stage's model becomes the run's model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from multitune.config.loader import save_config, stage_training
from multitune.config.schema import BackboneConfig, RunConfig, StageConfig
from multitune.data.fingerprint import data_files
from multitune.errors import ConfigError, MultituneError
from multitune.fileio import copy_tree_linked, replace_dir, write_json_atomic
from multitune.rundir import check_output_dir, clear_dir, lock_dir, lock_scope, write_marker
from multitune.training.callbacks import Callback, EvaluateHook
from multitune.training.progress import stderr_console
from multitune.training.run import StagePlan
from multitune.training.run_dir import check_run_dir
from multitune.training.stages import forgetting_matrix, write_forgetting
from multitune.training.trainer import train_run


@dataclass
class Stage:
    """One single run of a staged run: its name, its own run config (``output_dir`` under ``RUN/stages/``,
    backbone = the previous stage's model) and what it trains and evaluates."""

    name: str
    config: RunConfig
    plan: StagePlan


def train(config: RunConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None,
          progress: bool = True, plan: StagePlan | None = None, on_evaluate: Callable[..., Any] | None = None,
          accept_changed_data: bool = False, protect: tuple[Path, ...] = (),
          callbacks: Sequence[Callback] = ()) -> dict:
    """Train one multi-task model as ``config`` says and write the run directory.

    Args:
        config: a validated config (see :func:`multitune.config.load_config`).
        resume: continue from ``output_dir/checkpoints/last`` (starts afresh when there is none); a staged run
            skips its finished stages. Only ``training.max_steps`` may differ from the run's saved config (not
            below the steps made): a larger value extends a finished or interrupted run, with the learning-rate
            schedule rebuilt for the new total (see :func:`multitune.training.setup.continue_schedule`). A
            finished run resumed with nothing left to train says so and returns its ``results.json``.
        overwrite: replace a non-empty ``output_dir`` that multitune wrote.
        console: where progress and tables go (default: stderr; not wrapped when it is not a terminal).
        progress: show a live progress bar.
        plan: train only ``plan.active`` and evaluate ``plan.seen`` (one stage; ``config`` without stages).
        on_evaluate: called after each validation evaluation (after its checkpoint) with keywords ``step``
            (counted over the stages of a staged run), ``results`` (task -> metrics), ``tasks`` and ``model``;
            what it raises ends the run (a search prunes a trial so).
        accept_changed_data: resume even when a data file differs from the one the checkpoint was trained on.
        protect: more paths ``--overwrite`` must never clear (e.g. the config file); the run's data files,
            the current and home directories and filesystem roots are always protected.
        callbacks: :class:`~multitune.training.callbacks.Callback` objects, called after the built-in ones at
            every event of every stage.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError, DataError, MultituneError: bad config, data or run directory; nothing is written then.
            The run directory is locked while the run writes it: a second process gets a one-line error.
    """
    console = console or stderr_console()
    callbacks = [*callbacks, *([EvaluateHook(on_evaluate)] if on_evaluate is not None else [])]
    if not config.runs_in_stages:
        return train_run(config, resume, overwrite, console, progress, plan, callbacks, accept_changed_data,
                         tuple(protect))
    if plan is not None:
        raise MultituneError("a stage's plan is for a run without stages; this config runs in stages")
    with lock_scope():
        return train_stages(config, resume, overwrite, console, progress, callbacks, accept_changed_data,
                            tuple(protect))


def plan_stages(config: RunConfig) -> tuple[RunConfig, list[Stage]]:
    """The stages of a staged run, checked before anything runs.

    Returns:
        ``(config with its stages written out, stages)``; AdapterFusion becomes the stages ``adapters`` and
        ``fusion``.

    Raises:
        ConfigError: a stage's early-stopping metric names a task the stage does not train.
    """
    staged, stage_adapters = config, None
    if config.adapters is not None and config.adapters.layout.staged:
        staged, stage_adapters = _fusion_stages(config)
    out, stages, seen, previous, offset = Path(config.output_dir), [], [], None, 0
    for i, stage in enumerate(staged.stages):
        seen = seen + [t for t in stage.tasks if t not in seen]
        tcfg = stage_training(staged, i)
        es = tcfg.early_stopping
        if es is not None and es.metric != "mean" and es.metric.split("/")[0] not in stage.tasks:
            raise ConfigError(f"stages[{i}].training.early_stopping.metric",
                              f"names task {es.metric.split('/')[0]!r}, which this stage does not train")
        sub = copy.deepcopy(staged)
        sub.stages, sub.training, sub.output_dir = None, tcfg, str(stage_dir(out, i, stage.name))
        if stage_adapters is not None:
            sub.adapters = stage_adapters[i]
        if previous is not None:
            sub.backbone = BackboneConfig(type=staged.backbone.type, name=str(previous / "model"))
        stages.append(Stage(stage.name, sub, StagePlan(
            active=list(stage.tasks), seen=list(seen), replay=stage.replay,
            init_from=None if previous is None else previous / "model", step_offset=offset)))
        previous, offset = Path(sub.output_dir), offset + tcfg.max_steps
    return staged, stages


def train_stages(config: RunConfig, resume: bool, overwrite: bool, console: Console, progress: bool,
                 callbacks: Sequence[Callback], accept_changed_data: bool, protect: tuple[Path, ...]) -> dict:
    """Run the stages in order (``--resume`` skips finished stages and resumes the unfinished one), then write
    the forgetting matrix, the run's model (the last stage's) and ``results.json`` (the last stage's results
    plus ``stages`` and ``forgetting``)."""
    out = Path(config.output_dir)
    check_run_dir(config, out, resume, overwrite, protect)
    staged, stages = plan_stages(config)
    opened: list[bool] = []

    def open_once() -> None:  # once the first stage to train has passed its checks: a failed run writes nothing
        if not opened:
            opened.append(True)
            _open_staged_dir(config, out, resume, overwrite, protect)

    results: dict = {}
    stage_results = []
    for i, stage in enumerate(stages):
        tasks, replay = stage.plan.active, stage.plan.replay
        header = (f"stage {i + 1}/{len(stages)}: {stage.name} (tasks {', '.join(tasks)}"
                  + (f", replay {replay:g}" if replay else "") + ")")
        done = Path(stage.config.output_dir) / "results.json"
        if resume and done.is_file():
            results = json.loads(done.read_text(encoding="utf-8"))
            console.rule(header)
            console.print(f"stage {stage.name} is finished; skipped")
        else:
            stage.plan.before_write = lambda header=header: (open_once(), console.rule(header))
            results = train_run(stage.config, resume, overwrite, console, progress, stage.plan, callbacks,
                                accept_changed_data, protect)
        stage_results.append({"stage": stage.name, "tasks": list(tasks), "replay": replay,
                              "validation": results["validation"], "train": results["train"]})
    open_once()  # every stage was finished already (--resume)
    forgetting = forgetting_matrix(staged, stage_results)
    write_forgetting(out, forgetting, console)
    # the run's model is the last stage's model, so `multitune.load(RUN)` works as for a single-stage run
    tmp = out / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    copy_tree_linked(Path(stages[-1].config.output_dir) / "model", tmp)  # the same files: linked, not written again
    replace_dir(tmp, out / "model")
    final = {**results, "stages": stage_results, "forgetting": forgetting}
    write_json_atomic(out / "results.json", final)
    return final


def stage_dir(out: Path, index: int, name: str) -> Path:
    """``RUN/stages/NN-name`` (characters other than letters, digits, ``-_+`` become ``_``)."""
    safe = "".join(c if c.isalnum() or c in "-_+" else "_" for c in name)
    return out / "stages" / f"{index + 1:02d}-{safe}"


def _open_staged_dir(config: RunConfig, out: Path, resume: bool, overwrite: bool, protect: tuple[Path, ...]) -> None:
    """Lock, clear (``--overwrite``) and start the staged run's own directory with the config as given."""
    protected = (*protect, *data_files(config))
    lock_dir(out)
    if check_output_dir(out, overwrite=overwrite, resume=resume, protected=protected) and overwrite and not resume:
        clear_dir(out, protected)
    write_marker(out, "run")
    save_config(config, out / "config.yaml")


def _fusion_stages(config: RunConfig) -> tuple[RunConfig, list[Any]]:
    """AdapterFusion (Pfeiffer et al. 2021) as two stages: ``adapters`` trains one adapter per task (every task);
    ``fusion`` freezes them and trains, for each target task, fusion layers over all of them and the task's head
    (``adapters.fusion_steps`` steps). The forgetting matrix then compares each task after its own adapter with
    after fusion.

    Returns:
        ``(config with the two stages, the adapters section of each stage)``.
    """
    fusion = config.adapters
    per_task = dataclasses.replace(fusion, arrangement="per_task", fusion_targets=None, fusion_steps=None,
                                   fusion_learning_rate=None)
    steps = fusion.fusion_steps or config.training.max_steps
    staged = copy.deepcopy(config)
    staged.stages = [StageConfig(tasks=list(config.tasks), name="adapters"),
                     StageConfig(tasks=list(fusion.fusion_targets or config.tasks), name="fusion",
                                 training={"max_steps": steps, "eval_every": min(config.training.eval_every, steps)})]
    return staged, [per_task, fusion]
