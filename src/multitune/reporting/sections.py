"""The sections of the run report. Each builder returns the section's HTML body, or :class:`Omitted` with the
reason it is left out."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitune.evaluation.plots import plot_learning_curves, plot_sampling_shares
from multitune.reporting import figures as F
from multitune.reporting.markup import Raw, details, esc, figure, para, pre, table
from multitune.reporting.run import RunFiles, Timeline
from multitune.training.affinity import plot_affinity, transfer_summary
from multitune.training.stages import forgetting_markdown, plot_forgetting


@dataclass
class Omitted:
    """A section left out of the report, and why (the page lists these)."""

    reason: str


@dataclass
class Figures:
    """Where the report's PNGs go (``RUN/report/``), and which were written this time."""

    directory: Path
    written: list[Path] = field(default_factory=list)

    def path(self, name: str, timeline: Timeline | None = None) -> Path:
        suffix = f"-{timeline.label}" if timeline is not None and timeline.label else ""
        return self.directory / f"{name}{suffix}.png"

    def embed(self, path: Path | None, caption: str) -> str:
        if path is None:
            return ""
        self.written.append(path)
        return figure(path, caption, f"fig-{path.stem}")


def _stage_heading(run: RunFiles, timeline: Timeline) -> str:
    return f"<h3>stage {esc(timeline.label)}</h3>" if len(run.timelines) > 1 else ""


def _caption(text: str, timeline: Timeline) -> str:
    return f"{text} (stage {timeline.label})" if timeline.label else text


def _unset(value: Any) -> bool:
    return value is None or value is False or value in ([], {})  # 0 and 0.0 are settings


def _kv(value: Any) -> str:
    """A config section on one line: ``strategy: temperature, temperature: 2.0`` (unset fields left out)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in value.items()
                         if not _unset(v)) or "none"
    return "-" if value is None else str(value)


def _split_size(report: dict) -> int | None:
    for key in ("after_split", "carved_from_train", "sampled", "kept"):
        if isinstance(report.get(key), int):
            return report[key]
    return None


TRAINING_KEYS = ["max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "head_learning_rate",
                 "layer_lr_decay", "scheduler", "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm",
                 "max_length", "precision", "eval_every", "early_stopping", "gradual_unfreezing", "report_to"]


def build_config(run: RunFiles, figs: Figures) -> str | Omitted:
    cfg = run.config
    if cfg is None:
        return Omitted("config.yaml is missing or is not a YAML mapping")
    backbone = cfg.get("backbone")
    if isinstance(backbone, dict):
        name = backbone.get("name") or f"encoder {backbone.get('encoder')}, decoder {backbone.get('decoder')}"
        backbone = f"{name} ({backbone.get('type', 'auto')})"
    training = cfg.get("training") or {}
    rows = [("backbone", backbone), ("seed", cfg.get("seed")), ("sampling", _kv(cfg.get("sampling"))),
            ("loss weighting", _kv(cfg.get("loss_weighting"))),
            ("adapters", _kv(cfg.get("adapters")) if cfg.get("adapters") else "none (the backbone trains)"),
            ("freeze", _kv(cfg.get("freeze")))]
    if cfg.get("stages"):
        rows.append(("stages", "; ".join(f"{s.get('name') or '+'.join(s['tasks'])}: {', '.join(s['tasks'])}"
                                         + (f" (replay {s['replay']})" if s.get("replay") else "")
                                         for s in cfg["stages"])))
    rows += [(f"training.{k}", _kv(training[k])) for k in TRAINING_KEYS if not _unset(training.get(k))]
    data = run.results.get("data") or {}
    task_rows = []
    for name, task in (cfg.get("tasks") or {}).items():
        sizes = data.get(name) or {}
        task_rows.append([name, task.get("type", "?"), *[_split_size(sizes.get(s) or {}) for s in
                                                         ("train", "validation", "test")]])
    return (table(["setting", "value"], rows, "kv")
            + "<h3>tasks</h3>" + table(["task", "type", "train", "validation", "test"], task_rows)
            + para("Examples per split after cleaning, sampling and carving validation/test out of train.")
            + details("config.yaml (as the run saved it)", pre(run.config_text or "")))


def _metric_rows(results: dict, splits: list[str], per_label: bool) -> list[list[Any]]:
    rows = []
    tasks = list(dict.fromkeys(t for s in splits for t in results.get(s) or {}))
    for task in tasks:
        names = list(dict.fromkeys(m for s in splits for m in (results.get(s) or {}).get(task, {})))
        for m in names:
            if ("/" in m) == per_label:
                rows.append([task, m, *[(results.get(s) or {}).get(task, {}).get(m) for s in splits]])
    return rows


#: labels per task in the report's per-label table; a task with more shows the ones with the lowest F1
MAX_LABEL_ROWS = 30


def _bounded_per_label(rows: list[list[Any]], results: dict, splits: list[str]) -> tuple[list[list[Any]], list[str]]:
    """The per-label rows with at most :data:`MAX_LABEL_ROWS` labels per task: a task with more keeps the labels
    with the lowest F1 on the first split (ties: label order), and a note says so."""
    by_task: dict[str, list[list[Any]]] = {}
    for row in rows:
        by_task.setdefault(row[0], []).append(row)
    kept, notes = [], []
    for task, task_rows in by_task.items():
        labels = list(dict.fromkeys(row[1].partition("/")[2] for row in task_rows))
        if len(labels) > MAX_LABEL_ROWS:
            first = (results.get(splits[0]) or {}).get(task, {})
            f1 = [first.get(f"f1/{lab}") for lab in labels]
            order = sorted(range(len(labels)), key=lambda i: (f1[i] if isinstance(f1[i], (int, float)) else
                                                              float("inf"), i))
            shown = {labels[i] for i in order[:MAX_LABEL_ROWS]}
            task_rows = [row for row in task_rows if row[1].partition("/")[2] in shown]
            notes.append(f"{task}: {len(labels):,} labels; the {MAX_LABEL_ROWS} with the lowest {splits[0]} F1 "
                         f"are shown, results.json has every label's metrics.")
        kept += task_rows
    return kept, notes


def build_metrics(run: RunFiles, figs: Figures) -> str | Omitted:
    splits = [s for s in ("validation", "test") if run.results.get(s)]
    if not splits:
        return Omitted("results.json has no validation or test metrics")
    body = para("Final metrics of the restored best model (the validation split selects it; test is scored "
                "once, at the end).")
    body += table(["task", "metric", *splits], _metric_rows(run.results, splits, False))
    per_label, notes = _bounded_per_label(_metric_rows(run.results, splits, True), run.results, splits)
    if per_label:
        body += details("per-label metrics", "".join(para(n) for n in notes)
                        + table(["task", "metric", *splits], per_label))
    train = run.results.get("train") or {}
    keys = ["steps", "best_step", "selection_metric", "best_value", "stopped_early", "wall_s", "examples_per_s",
            "real_tokens_per_s", "precision", "device", "skipped_steps"]
    rows = [(k, train[k]) for k in keys if k in train and train[k] not in ({}, None)]
    if rows:
        body += "<h3>training</h3>" + table(["", "value"], rows, "kv")
    if run.results.get("calibration"):
        body += details("decision thresholds tuned on validation", pre(json.dumps(run.results["calibration"],
                                                                                  indent=2)))
    return body


def _per_timeline(run: RunFiles, figs: Figures, name: str, caption: str,
                  plot: Callable[[list[dict], Path], Path | None]) -> str:
    body = ""
    for t in run.timelines:
        fig = figs.embed(plot(t.records, figs.path(name, t)), _caption(caption, t))
        if fig:
            body += _stage_heading(run, t) + fig
    return body


def build_curves(run: RunFiles, figs: Figures) -> str | Omitted:
    body = _per_timeline(run, figs, "learning_curves", "validation metrics per task and training loss by step",
                         plot_learning_curves)
    if not body:
        return Omitted("metrics.jsonl has no train or eval lines")
    return (para("One panel per task: its validation metrics at each evaluation; the last panel: each "
                 "task's mean training loss since the previous log line (log scale).") + body)


def build_loss_weights(run: RunFiles, figs: Figures) -> str | Omitted:
    body = _per_timeline(run, figs, "loss_weights", "loss weight per task", F.plot_loss_weights)
    if not body:
        return Omitted("the train lines of metrics.jsonl have no loss_weights")
    return (para("The weight each task's loss had in the combined loss at each log line (1.0 throughout "
                 "for sum; learned or adapted by uncertainty, DWA, GradNorm, FAMO, ...).") + body)


def build_sampling(run: RunFiles, figs: Figures) -> str | Omitted:
    body = _per_timeline(run, figs, "sampling_shares", "sampling share per task", plot_sampling_shares)
    changes = [[t.label or "-", r.get("step"), task, (r.get("shares") or {}).get(task), why]
               for t, r in run.records("sampling") for task, why in (r.get("reasons") or {}).items()]
    if changes:
        header = ["stage", "step", "task", "new share", "why"] if len(run.timelines) > 1 else \
            ["step", "task", "new share", "why"]
        rows = changes if len(run.timelines) > 1 else [c[1:] for c in changes]
        body += "<h3>changes made by the sampler</h3>" + table(header, rows)
    if not body:
        return Omitted("the run has fewer than two tasks per loop, or logged no sampling shares")
    return (para("The share of batches drawn from each task; a share holds until the next record changes "
                 "it (annealed and adaptive samplers change it during training).") + body)


def build_grad_stats(run: RunFiles, figs: Figures) -> str | Omitted:
    body = _per_timeline(run, figs, "grad_stats", "gradient statistics of the loss weighting", F.plot_grad_stats)
    if not body:
        return Omitted("no train line has grad_stats (gradient-level methods such as pcgrad, cagrad and gradnorm "
                       "log them)")
    return (para("What the gradient-level loss weighting saw at each log line: norms of the task gradients "
                 "on the shared parameters, their pairwise cosines (negative: the tasks conflict), "
                 "projected conflicts and the method's own weights.") + body)


def build_confusion(run: RunFiles, figs: Figures) -> str | Omitted:
    # a sequential run's final model is its last stage's: that stage evaluated every task
    source = run.path if list(run.path.glob("confusion_*.png")) else run.timelines[-1].path
    pngs = sorted(source.glob("confusion_*.png"))
    if not pngs:
        return Omitted("the run wrote no confusion_<task>.png (no classification task)")
    body = para("Validation predictions of the final model: rows are gold labels, columns predicted labels; each "
                "cell shows its count and is coloured by its share of the gold row.")
    for png in pngs:
        copy = figs.path(png.stem)
        tmp = copy.with_name(f".{copy.name}.tmp.png")
        shutil.copyfile(png, tmp)
        tmp.replace(copy)
        body += figs.embed(copy, f"{png.stem.removeprefix('confusion_')}: validation confusion matrix")
    return body


def build_forgetting(run: RunFiles, figs: Figures) -> str | Omitted:
    forgetting = run.results.get("forgetting")
    if not isinstance(forgetting, dict) or not forgetting.get("matrix"):
        return Omitted("not a sequential run (no stages, so no forgetting matrix in results.json)")
    stages = forgetting["stages"]
    rows = [[f"{task} ({forgetting['metric'].get(task, '')})", *[by_stage.get(s) for s in stages],
             forgetting["forgetting"].get(task)] for task, by_stage in forgetting["matrix"].items()]
    path = figs.path("forgetting")
    plot_forgetting(forgetting, path)
    body = (para("Main validation metric of each task after each stage; forgetting is the best value a task had "
                 "after an earlier stage minus its value after the last one (positive: forgotten).")
            + table(["task (metric)", *[f"after {s}" for s in stages], "forgetting"], rows)
            + (figs.embed(path, "metric of each task after each stage") if path.is_file() else "")
            + details("forgetting.md", pre(forgetting_markdown(forgetting))))
    return body


def build_affinity(run: RunFiles, figs: Figures) -> str | Omitted:
    body = ""
    for t in run.timelines:
        records = [r for r in t.records if r.get("kind") == "affinity"]
        # the same summary the run put into results.json (a sequential run's results hold the last stage's only)
        summary = transfer_summary(records) or (run.results.get("transfer") if len(run.timelines) == 1 else None)
        if not summary or not F.is_matrix(summary.get("cosine")) or not F.is_matrix(summary.get("tag")):
            continue
        n = summary.get("samples", len(records))
        heat = plot_affinity(summary["cosine"], summary["tag"], figs.path("affinity", t),
                             f"mean of {n} measurement{'s' * (n != 1)}")
        steps = ", ".join(map(str, summary.get("steps") or [r.get("step") for r in records]))
        body += (_stage_heading(run, t)
                 + para(f"{n} measurement{'s' * (n != 1)} (steps {steps}); they took {summary.get('seconds', '?')} s.")
                 + figs.embed(heat, _caption("gradient cosine similarity and look-ahead affinity (TAG): mean", t))
                 + figs.embed(F.plot_pairs_over_time(records, ["cosine", "tag"], figs.path("affinity_over_time", t)),
                              _caption("each pair of tasks over training", t))
                 + details("mean matrices (JSON)", pre(json.dumps({k: summary[k] for k in ("cosine", "tag")},
                                                                  indent=2, ensure_ascii=False))))
    if not body:
        return Omitted("no affinity records in metrics.jsonl and no transfer in results.json (set "
                       "analysis.affinity_every to measure it)")
    intro = para("Measured on the shared trainable parameters during training. Cosine: cosine similarity of the "
                 "task gradients (negative: the tasks pull apart). TAG: look-ahead task affinity (Fifty et al. "
                 "2021), 1 - L_j after a step on task i's gradient / L_j before (row i, column j; positive: a step "
                 "on i lowers j's loss).")
    return intro + body


def build_adapters(run: RunFiles, figs: Figures) -> str | Omitted:
    adapters = run.results.get("adapters")
    if not isinstance(adapters, dict):
        return Omitted("no adapters (the backbone itself was fine-tuned)")
    rows = [("method", adapters.get("method")), ("arrangement", adapters.get("arrangement")),
            ("trainable adapter parameters", adapters.get("trainable"))]
    body = table(["", "value"], rows, "kv")
    per_task = adapters.get("bytes_per_task")
    if isinstance(per_task, dict) and per_task:
        body += "<h3>size of each task's adapter</h3>" + table(["task", "bytes"], list(per_task.items()))
    elif per_task is not None:
        body += para(f"bytes per task: {per_task}")
    attention = adapters.get("fusion_attention")
    if F.is_matrix(attention):
        body += "<h3>AdapterFusion attention</h3>" + para(
            "Mean attention of each target task (row) over the task adapters (columns) on the final validation "
            "pass: which tasks' adapters a target draws on.")
        body += figs.embed(F.plot_heatmap(attention, "fusion attention", figs.path("fusion_attention"),
                                          xlabel="adapter", ylabel="target task"),
                           "AdapterFusion attention of each target task over the adapters")
    return body


def build_parameters(run: RunFiles, figs: Figures) -> str | Omitted:
    if not run.parameters:
        return Omitted("parameters.json is missing")
    body = para("Trainable and frozen parameters of each group, its learning rate and, with gradual unfreezing, "
                "the step at which it opens.")
    for label, rows in run.parameters:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        total = ["total", *[sum(r.get(k) or 0 for r in rows) if k in ("trainable", "frozen") else Raw("")
                            for k in keys[1:]]]
        if label:
            body += f"<h3>stage {esc(label)}</h3>"
        body += table(keys, [[r.get(k) for k in keys] for r in rows] + [total])
    return body


SECTIONS: list[tuple[str, str, Callable[[RunFiles, Figures], str | Omitted]]] = [
    ("config", "Configuration", build_config),
    ("metrics", "Final metrics", build_metrics),
    ("curves", "Learning curves", build_curves),
    ("loss-weights", "Loss weights over time", build_loss_weights),
    ("sampling", "Sampling shares over time", build_sampling),
    ("grad-stats", "Gradient statistics", build_grad_stats),
    ("confusion", "Confusion matrices", build_confusion),
    ("forgetting", "Forgetting matrix", build_forgetting),
    ("affinity", "Task affinity", build_affinity),
    ("adapters", "Adapters", build_adapters),
    ("parameters", "Parameters", build_parameters),
]
