"""What a search writes: ``best.yaml`` (runnable), ``trials.csv`` and ``trials.md``, and the plots
``optimization_history.png`` and ``param_importances.png``."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import yaml

from multitune.config.loader import load_config
from multitune.config.parse import to_dict
from multitune.fileio import write_text_atomic
from multitune.search.space import overrides_for


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, each parameter, steps, best step, seconds, run directory."""
    params = list(dict.fromkeys(p for t in study.get_trials(deepcopy=False) for p in t.params))
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     "value": None if t.value is None else round(t.value, 6),
                     **{p: t.params.get(p) for p in params},
                     "steps": t.user_attrs.get("steps", last), "best_step": t.user_attrs.get("best_step"),
                     "seconds": None if seconds is None else round(seconds, 1),
                     "run_dir": t.user_attrs.get("run_dir")})
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_reports(study: Any, output: Path, config_path: Path, overrides: list[str], metric: str,
                  plots: bool = True) -> None:
    """Write the trials table, ``best.yaml`` (once a trial completed) and, with ``plots``, the plots."""
    rows = trial_rows(study)
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(output / "trials.csv", buf.getvalue())
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value) if complete else None
    baseline = study.user_attrs.get("baseline_value")
    lines = [f"# Search `{study.study_name}`", "",
             f"Objective: `{metric}` on validation, maximised. Strategy: {study.user_attrs.get('strategy')}. "
             f"{len(complete)} completed, {sum(r['state'] == 'pruned' for r in rows)} pruned, "
             f"{sum(r['state'] == 'fail' for r in rows)} failed.", ""]
    if best is not None:
        lines.append(f"Best: trial {best.number}, {best.value:.4f}" +
                     (f" (the unchanged config: {baseline:.4f})" if baseline is not None else "") + ".")
        lines.append("")
    cols = [c for c in rows[0] if c != "run_dir"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    write_text_atomic(output / "trials.md", "\n".join(lines) + "\n")
    if best is not None:
        write_best_config(best, output, config_path, overrides, metric, baseline)
    if plots:
        plot_history(study, output / "optimization_history.png", metric, baseline)
        plot_importances(study, output / "param_importances.png")


def write_best_config(best: Any, output: Path, config_path: Path, overrides: list[str], metric: str,
                      baseline: float | None) -> None:
    """``best.yaml``: the config with the best trial's values, resolved (absolute paths), training into
    ``OUTPUT/best``; ``multitune train OUTPUT/best.yaml`` reproduces the trial."""
    config = load_config(config_path, overrides + overrides_for({**best.params, "output_dir": str(output / "best")}))
    header = [f"# multitune train {output / 'best.yaml'}",
              f"# best of the search in {output}: trial {best.number}, {metric} = {best.value:.6f}"
              + (f" (unchanged config: {baseline:.6f})" if baseline is not None else ""),
              f"# from {config_path.resolve()} with: " + ", ".join(overrides_for(best.params))]
    write_text_atomic(output / "best.yaml", "\n".join(header) + "\n" + yaml.safe_dump(
        to_dict(config), sort_keys=False, allow_unicode=True))


def plot_history(study: Any, path: Path, metric: str, baseline: float | None) -> None:
    """Each completed trial's value in trial order, the best so far, and the baseline if known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED" and t.intermediate_values]
    fig, ax = plt.subplots(figsize=(7, 4))
    if done:
        xs, ys = [t.number for t in done], [t.value for t in done]
        ax.scatter(xs, ys, s=22, label="trial", zorder=3)
        best = [max(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter([t.number for t in pruned],
                   [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   marker="x", color="grey", label="pruned (last evaluation)")
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="unchanged config")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title(f"optimisation history: {study.study_name}")
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importances(study: Any, path: Path) -> None:
    """fANOVA parameter importances (Hutter et al. 2014) over the completed trials, as bars; with fewer than
    two completed trials (or one value per parameter) the figure says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    importances: dict[str, float] = {}
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError):  # too few completed trials, or nothing varied
        pass
    importances = {k: v for k, v in importances.items() if not math.isnan(v)}
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * max(len(importances), 1)))
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    else:
        ax.text(0.5, 0.5, "needs at least two completed trials with different values", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"parameter importances: {study.study_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
