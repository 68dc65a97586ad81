"""``multitune search``: hyperparameter search over config fields with Optuna.

Each trial is a full training run in ``OUTPUT/trials/NNN`` with the sampled values applied as ``--set``
overrides. Its value is the objective metric on the validation split of the run's final (best) model; the
value at every evaluation during training is reported to the pruner, which can stop a trial early. The
study lives in an Optuna storage (default: ``OUTPUT/study.db``, SQLite), so running the same command again
continues it up to ``trials`` finished trials, and several workers can share one study through a database
server (see docs/search.md).
"""

from __future__ import annotations

import gc
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from multitune.config.loader import apply_overrides, load_config, read_yaml
from multitune.errors import ConfigError, MultituneError
from multitune.evaluation.evaluator import selection_value
from multitune.rundir import MARKER, RunDirError, created_by_multitune, write_marker
from multitune.search.report import write_reports
from multitune.search.space import SearchSpace, load_space, overrides_for
from multitune.training import train
from multitune.training.progress import stderr_console

STRATEGIES = ["tpe", "random", "grid"]
PRUNERS = ["median", "none"]
FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class SearchResult:
    """What a search returns (and wrote to its output directory).

    Attributes:
        best_value: the best trial's objective value (higher is better; lower-is-better metrics negated).
        best_params: field path -> value of the best trial.
        best_trial: the best trial's number (its run is ``OUTPUT/trials/NNN``).
        finished: trials that completed or were pruned, in the whole study.
        baseline_value: the unchanged config's value, when it was trained (``baseline``).
    """

    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    finished: int
    baseline_value: float | None = None


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise MultituneError("search needs the optional extra: pip install 'multitune[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial outcomes are reported as our own one-liners
    return optuna


def build_sampler(strategy: str, space: SearchSpace, seed: int, trials: int = 30) -> Any:
    """The Optuna sampler of ``strategy`` (``tpe``, ``random`` or ``grid``), seeded. TPE starts with
    ``trials // 3`` random trials (at least 3, at most Optuna's default 10), so that a short search still
    has trials that TPE chooses.

    Raises:
        MultituneError: an unknown strategy, or a grid over a range without a step.
    """
    optuna = _import_optuna()
    if strategy == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, trials // 3)))
    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    raise MultituneError(f"--strategy: got {strategy!r}; expected one of: {', '.join(STRATEGIES)}")


def build_pruner(name: str, startup_trials: int = 3) -> Any:
    """``median``: stop a trial whose value at an evaluation is below the median of earlier trials at that
    step, once ``startup_trials`` trials have finished; ``none``."""
    optuna = _import_optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise MultituneError(f"--pruner: got {name!r}; expected one of: {', '.join(PRUNERS)}")


def _claim_output(output: Path) -> None:
    """Use ``output`` for the search: new, empty, or a search multitune started there (several workers may
    share one); never a folder of the user's, whose files the reports would overwrite."""
    if output.exists() and not output.is_dir():
        raise RunDirError(f"--output-dir: {output} exists and is not a directory")
    if output.exists() and any(p.name != MARKER for p in output.iterdir()) and not (
            created_by_multitune(output) or (output / "study.db").is_file()):
        raise RunDirError(f"--output-dir: {output} is not empty and was not written by multitune (no {MARKER} "
                          f"file); choose another --output-dir (multitune never overwrites files it did not create)")
    output.mkdir(parents=True, exist_ok=True)
    write_marker(output, "search")


def _storage(url: str | None, output: Path) -> Any:
    optuna = _import_optuna()
    url = url or f"sqlite:///{(output / 'study.db').resolve()}"
    try:  # a worker that dies leaves its trial RUNNING: after the grace period another worker fails it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
    except Exception as exc:  # a bad URL, a missing driver, an unreachable server
        raise MultituneError(f"--storage: cannot open {url.split('@')[-1]}: {str(exc).splitlines()[0]}") from None


def _check_metric(metric: str, tasks: dict) -> None:
    if metric == "mean":
        return
    task, _, name = metric.partition("/")
    if task not in tasks or not name:
        raise MultituneError(f"--metric: expected 'mean' or 'task/metric' with a task of this run "
                             f"({', '.join(tasks)}), got {metric!r}")


class _Objective:
    """Trains one trial and returns its value; reports every evaluation to the pruner."""

    def __init__(self, config_path: Path, overrides: list[str], space: SearchSpace, metric: str, output: Path,
                 keep_checkpoints: bool, console: Console):
        self.config_path, self.overrides, self.space, self.metric = config_path, overrides, space, metric
        self.output, self.keep_checkpoints, self.console = output, keep_checkpoints, console

    def run(self, overrides: list[str], run_dir: Path, log_name: str, trial: Any = None) -> tuple[float, dict]:
        """Train with ``overrides`` into ``run_dir``; return (objective value, results)."""

        optuna = _import_optuna()
        config = load_config(self.config_path, self.overrides + overrides + overrides_for({"output_dir": str(run_dir)}))
        if not self.keep_checkpoints:  # a trial is judged by its final model: no per-task snapshots to write
            config.training.per_task_best = False
        seen: dict[str, Any] = {}

        def report(step: int, results: dict, tasks: dict, model: Any) -> None:
            seen["tasks"] = tasks
            if trial is None or (self.metric != "mean" and self.metric.split("/")[0] not in results):
                return  # (an early stage of a staged run does not evaluate the metric's task yet)
            trial.report(selection_value(self.metric, results, tasks), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

        log_dir = self.output / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"{log_name}.log", "w", encoding="utf-8") as log:
            try:
                results = train(config, overwrite=True, console=Console(file=log, width=120), progress=False,
                                on_evaluate=report, protect=(self.config_path,))
            finally:
                if not self.keep_checkpoints:
                    for checkpoints in [run_dir / "checkpoints", *run_dir.glob("stages/*/checkpoints")]:
                        shutil.rmtree(checkpoints, ignore_errors=True)
                gc.collect()
        return selection_value(self.metric, results["validation"], seen["tasks"]), results

    def __call__(self, trial: Any) -> float:
        values = self.space.suggest(trial)
        run_dir = self.output / "trials" / f"{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        start = time.perf_counter()
        try:
            value, results = self.run(overrides_for(values), run_dir, f"{trial.number:03d}", trial)
        except MultituneError as exc:
            self.console.print(f"trial {trial.number}: [red]failed[/] ({shown}): {exc}")
            raise
        except _import_optuna().TrialPruned as exc:
            self.console.print(f"trial {trial.number}: [yellow]{exc}[/] ({shown})")
            raise
        trial.set_user_attr("best_step", results["train"]["best_step"])
        trial.set_user_attr("steps", results["train"]["steps"])
        self.console.print(f"trial {trial.number}: {self.metric} = {value:.4f} ({shown}) in "
                           f"{time.perf_counter() - start:.0f}s")
        return value


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_search(config_path: str | Path, space_path: str | Path, output_dir: str | Path, strategy: str = "tpe",
               trials: int | None = None, metric: str | None = None, storage: str | None = None,
               study_name: str | None = None, overrides: list[str] | None = None, seed: int | None = None,
               pruner: str | Any = "median", baseline: bool = False, keep_checkpoints: bool = False,
               console: Console | None = None) -> SearchResult:
    """Search config values with Optuna and write the best config, a trials table and plots.

    Args:
        config_path: the run config (YAML) every trial starts from.
        space_path: the search space (see :mod:`multitune.search.space`).
        output_dir: where trials, logs, ``study.db``, ``best.yaml``, ``trials.csv``/``.md`` and plots go.
        strategy: ``tpe``, ``random`` or ``grid``.
        trials: finished (completed or pruned) trials the study should hold (default: the grid's size for
            ``grid``, else 20); a resumed study runs only the missing ones.
        metric: the objective: ``mean`` or ``task/metric`` on validation (default: the config's
            ``training.early_stopping.metric``, else ``mean``); maximised, lower-is-better metrics negated.
        storage: an Optuna storage URL (default: SQLite ``OUTPUT/study.db``); a database server lets
            several workers share one study.
        study_name: the study's name in the storage (default: the output directory's name).
        overrides: ``--set`` overrides applied to the config before the sampled values.
        seed: the sampler's seed (default: the config's seed).
        pruner: ``median``, ``none`` or an Optuna pruner.
        baseline: also train the unchanged config once (``OUTPUT/baseline``) and report its value.
        keep_checkpoints: keep each trial's ``checkpoints/`` (default: removed after the trial; ``model/`` stays).
        console: where progress lines go (default: stderr).

    Returns:
        The best trial and counts (see :class:`SearchResult`).

    Raises:
        MultituneError: a bad config, space, strategy, metric or storage (before any trial runs), a study
            started with another space, strategy or metric, or no trial finished.
    """
    optuna = _import_optuna()

    console = console or stderr_console()
    config_path, output = Path(config_path), Path(output_dir).resolve()
    overrides = list(overrides or [])
    config = load_config(config_path, overrides)  # the base config must be valid by itself
    metric = metric or (config.training.early_stopping.metric if config.training.early_stopping else "mean")
    _check_metric(metric, config.tasks)
    try:
        base = apply_overrides(read_yaml(config_path), overrides)
    except ConfigError as exc:
        raise MultituneError(str(exc)) from None
    space = load_space(space_path, base)
    if strategy == "grid":
        size = 1
        for values in space.grid().values():
            size *= len(values)
        trials = min(trials or size, size)
    trials = trials or 20
    if trials < 1:
        raise MultituneError(f"--trials: must be at least 1, got {trials}")
    sampler = build_sampler(strategy, space, config.seed if seed is None else seed, trials)
    _claim_output(output)
    study = optuna.create_study(storage=_storage(storage, output), sampler=sampler,
                                pruner=build_pruner(pruner) if isinstance(pruner, str) else pruner,
                                study_name=study_name or output.name, direction="maximize", load_if_exists=True)
    settings = {"space": space.describe(), "strategy": strategy, "metric": metric}
    for key, value in settings.items():
        previous = study.user_attrs.get(key)
        if previous is None:
            study.set_user_attr(key, value)
        elif previous != value:
            raise MultituneError(f"study {study.study_name!r} was started with another {key} ({_short(previous)}"
                                 f"); use another --output-dir or --study-name")
    objective = _Objective(config_path, overrides, space, metric, output, keep_checkpoints, console)
    if baseline and "baseline_value" not in study.user_attrs:
        console.print("baseline: the config as it is")
        value, _ = objective.run([], output / "baseline", "baseline")
        study.set_user_attr("baseline_value", value)
        console.print(f"baseline: {metric} = {value:.4f}")

    def finished() -> int:
        return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))

    done = finished()
    console.print(f"search: {strategy}, {len(space.parameters)} parameters, objective {metric} (maximised); "
                  f"{done} of {trials} trials finished; study {study.study_name!r} in "
                  f"{storage.split('@')[-1] if storage else output / 'study.db'}")
    if done < trials:
        states = tuple(optuna.trial.TrialState[s] for s in FINISHED)
        study.optimize(objective, n_trials=trials - done, catch=(MultituneError,), callbacks=[
            optuna.study.MaxTrialsCallback(trials, states=states),
            lambda s, t: write_reports(s, output, config_path, overrides, metric, plots=False)])
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        raise MultituneError("search: no trial completed (see OUTPUT/logs and the lines above)")
    write_reports(study, output, config_path, overrides, metric, plots=True)
    best = study.best_trial
    console.print(f"best: trial {best.number}, {metric} = {best.value:.4f}; config in {output / 'best.yaml'}")
    return SearchResult(best.value, dict(best.params), best.number, finished(),
                        study.user_attrs.get("baseline_value"))
