"""Sequential training: stages run one after another on one model, each a full run of the one training
loop in ``RUN/stages/NN-name/``, starting from the previous stage's model. After every stage each task
seen so far is evaluated; the forgetting matrix (main metric of task i after stage j) is written as JSON,
markdown and a plot.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

from rich.console import Console

from multitune.config.adapters import AdapterConfig
from multitune.config.loader import save_config, stage_training
from multitune.config.schema import BackboneConfig, RunConfig, StageConfig
from multitune.data.fingerprint import data_files
from multitune.errors import ConfigError
from multitune.fileio import replace_dir, write_json_atomic, write_text_atomic
from multitune.rundir import check_output_dir, clear_dir, lock_dir, write_marker
from multitune.tasks import TASKS

FORGETTING = "forgetting"


def _stage_dir(out: Path, index: int, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_+" else "_" for c in name)
    return out / "stages" / f"{index + 1:02d}-{safe}"


def train_stages(config: RunConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None,
                 progress: bool = True, stage_adapters: list[AdapterConfig] | None = None,
                 as_given: RunConfig | None = None, accept_changed_data: bool = False,
                 protect: tuple[Path, ...] = ()) -> dict:
    """Run ``config.stages`` in order (see :func:`multitune.training.train`).

    Every stage's run directory holds all tasks (so splits and heads are the same in every stage); a stage
    trains its own tasks, plus ``replay`` of the batches from earlier stages' tasks, and evaluates the tasks
    seen so far. ``--resume`` skips finished stages and resumes the unfinished one from its checkpoint.

    Returns:
        ``results.json`` of the whole run: the last stage's results plus ``forgetting``.

    Args:
        stage_adapters: the ``adapters`` section of each stage (default: the run's, in every stage).
        as_given: the config as the user wrote it, saved and compared on ``--resume`` (default: ``config``).
        accept_changed_data, protect: as for :func:`multitune.training.train`.

    Raises:
        ConfigError, DataError, MultituneError: as :func:`multitune.training.train`.
    """
    from multitune.training.run_dir import check_run_dir
    from multitune.training.trainer import StagePlan, train

    console = console or Console(stderr=True)
    out = Path(config.output_dir)
    check_run_dir(as_given or config, out, resume, overwrite, protect)
    protected = (*protect, *data_files(config))
    plans = []
    seen: list[str] = []
    for i, stage in enumerate(config.stages):
        seen = seen + [t for t in stage.tasks if t not in seen]
        tcfg = stage_training(config, i)
        es = tcfg.early_stopping
        if es is not None and es.metric != "mean" and es.metric.split("/")[0] not in stage.tasks:
            raise ConfigError(f"stages[{i}].training.early_stopping.metric",
                              f"names task {es.metric.split('/')[0]!r}, which this stage does not train")
        plans.append((stage, tcfg, list(seen)))
    prepared = False

    def prepare_run_dir() -> None:
        """Clear (with --overwrite) and start the run directory: only once the first stage to train has
        passed every check, so that a run that fails validation leaves its directory as it was."""
        nonlocal prepared
        if prepared:
            return
        prepared = True
        lock_dir(out)
        if check_output_dir(out, overwrite=overwrite, resume=resume, protected=protected) \
                and overwrite and not resume:
            clear_dir(out, protected)
        write_marker(out, "run")
        save_config(as_given or config, out / "config.yaml")

    rows: dict[str, dict[str, float]] = {}  # task -> stage name -> main metric
    results: dict = {}
    previous: Path | None = None
    stage_results = []
    for i, (stage, tcfg, seen_now) in enumerate(plans):
        sub = copy.deepcopy(config)
        sub.stages = None
        sub.training = tcfg
        sub.output_dir = str(_stage_dir(out, i, stage.name))
        if stage_adapters is not None:
            sub.adapters = stage_adapters[i]
        if previous is not None:
            sub.backbone = BackboneConfig(type=config.backbone.type, name=str(previous / "model"))
        done = Path(sub.output_dir) / "results.json"
        header = (f"stage {i + 1}/{len(plans)}: {stage.name} (tasks {', '.join(stage.tasks)}"
                  + (f", replay {stage.replay:g}" if stage.replay else "") + ")")
        if resume and done.is_file():
            results = json.loads(done.read_text(encoding="utf-8"))
            console.rule(header)
            console.print(f"stage {stage.name} is finished; skipped")
        else:
            def start_stage(header=header) -> None:  # once the stage has passed its checks
                prepare_run_dir()
                console.rule(header)

            plan = StagePlan(active=list(stage.tasks), seen=seen_now, replay=stage.replay,
                             init_from=None if previous is None else previous / "model", before_write=start_stage)
            results = train(sub, resume=resume, overwrite=overwrite, console=console, progress=progress, plan=plan,
                            accept_changed_data=accept_changed_data, protect=protect)
        previous = Path(sub.output_dir)
        stage_results.append({"stage": stage.name, "tasks": list(stage.tasks), "replay": stage.replay,
                              "validation": results["validation"], "train": results["train"]})
        for task in seen_now:
            metrics = results["validation"].get(task)
            if metrics is not None:
                main = TASKS.get(config.tasks[task].type).main_metric_in(metrics)
                rows.setdefault(task, {})[stage.name] = metrics[main]

    prepare_run_dir()  # every stage was finished already (--resume)
    stages = [s.name for s in config.stages]
    forgetting = {"stages": stages, "metric": {t: _main_metric_name(config, t, stage_results) for t in rows},
                  "matrix": rows, "forgetting": _forgetting(rows, stages)}
    write_json_atomic(out / f"{FORGETTING}.json", forgetting)
    write_text_atomic(out / f"{FORGETTING}.md", _markdown(forgetting))
    _plot(forgetting, out / f"{FORGETTING}.png")
    # the run's model is the last stage's model, so `multitune.load(RUN)` works as for a single-stage run
    tmp = out / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(previous / "model", tmp)
    replace_dir(tmp, out / "model")
    final = {**results, "stages": stage_results, "forgetting": forgetting}
    write_json_atomic(out / "results.json", final)
    _print_matrix(console, forgetting)
    return final


def train_fusion(config: RunConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None,
                 progress: bool = True, accept_changed_data: bool = False, protect: tuple[Path, ...] = ()) -> dict:
    """AdapterFusion (Pfeiffer et al. 2021) as two stages of one run: ``adapters`` trains one bottleneck
    adapter per task (every task); ``fusion`` freezes them and trains, for each target task, fusion layers
    over all of them and the task's head (``adapters.fusion_steps`` steps). The forgetting matrix of the run
    compares each task after its own adapter with after fusion.

    Returns:
        ``results.json`` of the run, as :func:`train_stages` writes it.

    Raises:
        ConfigError, DataError, MultituneError: as :func:`multitune.training.train`.
    """
    fusion = config.adapters
    targets = list(fusion.fusion_targets or config.tasks)
    per_task = dataclasses.replace(fusion, arrangement="per_task", fusion_targets=None, fusion_steps=None,
                                   fusion_learning_rate=None)
    steps = fusion.fusion_steps or config.training.max_steps
    staged = copy.deepcopy(config)
    staged.stages = [StageConfig(tasks=list(config.tasks), name="adapters"),
                     StageConfig(tasks=targets, name="fusion",
                                 training={"max_steps": steps, "eval_every": min(config.training.eval_every, steps)})]
    return train_stages(staged, resume=resume, overwrite=overwrite, console=console, progress=progress,
                        stage_adapters=[per_task, fusion], as_given=config,
                        accept_changed_data=accept_changed_data, protect=protect)


def _main_metric_name(config: RunConfig, task: str, stage_results: list[dict]) -> str:
    for r in stage_results:
        if task in r["validation"]:
            return TASKS.get(config.tasks[task].type).main_metric_in(r["validation"][task])
    return ""


def _forgetting(rows: dict[str, dict[str, float]], stages: list[str]) -> dict[str, float]:
    """Per task: the best value it reached after any stage minus its value after the last stage
    (Chaudhry et al. 2018). Positive means forgotten; for lower-is-better metrics read the sign reversed."""
    out = {}
    for task, by_stage in rows.items():
        values = [by_stage[s] for s in stages if s in by_stage]
        if len(values) > 1:
            out[task] = max(values[:-1]) - values[-1]
    return out


def _markdown(f: dict) -> str:
    stages = f["stages"]
    lines = ["| task (metric) | " + " | ".join(f"after {s}" for s in stages) + " | forgetting |",
             "|---|" + "---|" * (len(stages) + 1)]
    for task, by_stage in f["matrix"].items():
        cells = [f"{by_stage[s]:.4f}" if s in by_stage else "-" for s in stages]
        forget = f["forgetting"].get(task)
        lines.append(f"| {task} ({f['metric'][task]}) | " + " | ".join(cells)
                     + f" | {'-' if forget is None else f'{forget:+.4f}'} |")
    return "\n".join(lines) + "\n"


def _print_matrix(console: Console, f: dict) -> None:
    from rich.table import Table

    table = Table(title="forgetting matrix: main metric of each task after each stage")
    table.add_column("task")
    for s in f["stages"]:
        table.add_column(f"after {s}", justify="right")
    table.add_column("forgetting", justify="right")
    for task, by_stage in f["matrix"].items():
        forget = f["forgetting"].get(task)
        table.add_row(f"{task} ({f['metric'][task]})", *[f"{by_stage[s]:.4f}" if s in by_stage else "-"
                                                         for s in f["stages"]],
                      "-" if forget is None else f"{forget:+.4f}")
    console.print(table)


def _plot(f: dict, path: Path) -> None:
    """Heat map of the forgetting matrix (tasks x stages), values annotated."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:  # a broken matplotlib must not lose a finished run
        return
    tasks, stages = list(f["matrix"]), f["stages"]
    grid = np.full((len(tasks), len(stages)), np.nan)
    for i, t in enumerate(tasks):
        for j, s in enumerate(stages):
            if s in f["matrix"][t]:
                grid[i, j] = f["matrix"][t][s]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(stages), 1.2 + 0.6 * len(tasks)))
    ax.imshow(np.nan_to_num(grid, nan=np.nanmin(grid) if np.isfinite(grid).any() else 0.0), cmap="viridis",
              aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(stages)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(stages)), [f"after {s}" for s in stages])
    ax.set_yticks(range(len(tasks)), [f"{t} ({f['metric'][t]})" for t in tasks])
    ax.set_title("metric of each task after each stage")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)

