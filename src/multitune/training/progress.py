"""What a run shows on its console: the progress bar (or plain loss lines without one), evaluation lines, the
parameter and results tables and the next commands."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

#: columns of a console that is not a terminal (a CI log, ``2>log``), instead of rich's 80
LOG_WIDTH = 160


def stderr_console() -> Console:
    """The console a run reports on: stderr. When stderr is not a terminal (a CI log, ``2>log``) lines are not
    wrapped at all (``soft_wrap``) and tables get :data:`LOG_WIDTH` columns instead of rich's 80, unless the
    ``COLUMNS`` environment variable sets the width."""
    console = Console(stderr=True)
    if not console.is_terminal and not console.is_jupyter:
        console.soft_wrap = True
        if not os.environ.get("COLUMNS"):
            console.width = LOG_WIDTH
    return console


def live_display(console: Console) -> bool:
    """Whether ``console`` can show a live progress bar (in a log file rich would only print its last frame)."""
    return console.is_jupyter or console.is_terminal and not console.is_dumb_terminal


class TrainingProgress:
    """The live progress bar with the current task losses, and the evaluation lines. Disabled (``--no-progress``,
    a console that is not a terminal, or not the main process), it prints the loss lines that
    :class:`~multitune.training.callbacks.MetricsLogger` hands it instead."""

    def __init__(self, console: Console, total: int, enabled: bool = True):
        self.console = console
        self.total = total
        self.enabled = enabled
        self.progress = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.description}"), console=console,
                                 disable=not enabled)
        self.task_id = None

    def start(self, completed: int) -> None:
        self.progress.start()
        self.task_id = self.progress.add_task("", total=self.total, completed=completed)

    def update(self, step: int, losses: dict[str, float]) -> None:
        text = " ".join(f"{n}={v:.3f}" for n, v in losses.items())
        self.progress.update(self.task_id, completed=step, description=text)

    def log_losses(self, step: int, losses: dict[str, float], lr: float) -> None:
        """Without the live bar: one plain line of the mean loss of each task since the last line, and the learning
        rate, e.g. ``step 20/100: loss sentiment=0.6931 ner=1.2040 | lr 0.0009``."""
        if not self.enabled:
            text = " ".join(f"{n}={v:.4f}" for n, v in losses.items())
            self.console.print(f"step {step}/{self.total}: loss {text} | lr {lr:.3g}", markup=False, highlight=False)

    def log_eval(self, step: int, results: dict[str, dict[str, float]], value: float, improved: bool) -> None:
        parts = []
        for task, metrics in results.items():
            # per-class metrics (precision/<label>...) stay in metrics.jsonl; the log line keeps the summary
            parts.append(task + " " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" not in k))
        mark = " *best*" if improved else ""
        self.console.print(f"step {step}: " + " | ".join(parts) + f" | selection={value:.4f}{mark}")

    def stop(self) -> None:
        self.progress.stop()


def print_results_table(console: Console, results: dict, tasks: dict) -> None:
    """One row per task and split, main metric first."""
    table = Table(title="results (restored best model)")
    for col in ("task", "type", "split", "metrics"):
        table.add_column(col)
    for split in ("validation", "test"):
        for name, metrics in results.get(split, {}).items():
            main = tasks[name].main_metric
            ordered = [main] + [k for k in metrics if k != main and "/" not in k]
            table.add_row(name, tasks[name].config.type, split,
                          "  ".join(f"{k}={metrics[k]:.4f}" for k in ordered))
    console.print(table, soft_wrap=False)  # a table fits the console width (centred title), even in a log
    tr = results.get("train", {})
    if tr:
        packed = f", packing efficiency {tr['packing_efficiency']:.0%}" if "packing_efficiency" in tr else ""
        peak = "".join(f", peak {label} {tr[key]:.2f} GB" for key, label in
                       (("peak_rss_gb", "RSS"), ("peak_device_memory_gb", "device memory")) if key in tr)
        console.print(f"{tr['steps']} steps in {tr['wall_s']:.1f}s, {tr['examples_per_s']:.1f} examples/s, "
                      f"{tr['real_tokens_per_s']:.0f} real tokens/s ({tr['padded_tokens_per_s']:.0f} padded{packed}), "
                      f"best step {tr['best_step']}{peak}" + disk_summary(tr))


def disk_summary(train: dict) -> str:
    """The end of the end-of-train line: the whole process's time and what the run wrote, e.g.
    ``; process 533.7s; wrote 635 MB in 3.0s, 363 MB on disk`` (empty for results without them)."""
    if "bytes_written" not in train:
        return ""
    process = f"; process {train['process_s']:.1f}s" if train.get("process_s") is not None else ""
    return (f"{process}; wrote {train['bytes_written'] / 1e6:,.0f} MB in {train['write_s']:.1f}s, "
            f"{train['disk_bytes'] / 1e6:,.0f} MB on disk")


def print_parameter_table(console: Console, rows: list[dict]) -> None:
    """Trainable and frozen parameter counts per part of the model and the learning rate each part gets.

    Consecutive layers that are alike (same counts, learning rate and unfreezing step) share one row,
    ``backbone/layer_00-05`` with ``1,774,464 each``; ``parameters.json`` keeps one row per part.
    """
    table = Table(title="parameters", show_lines=False)
    for col in ("part", "trainable", "frozen", "lr", "unfreezes at step"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for part, r, n in collapse_layers(rows):
        each = " each" if n > 1 else ""
        table.add_row(part, f"{r['trainable']:,}" + (each if r["trainable"] else ""),
                      f"{r['frozen']:,}" + (each if r["frozen"] else ""),
                      "-" if r["lr"] is None else f"{r['lr']:.3g}",
                      "-" if r["unfreezes_at_step"] is None else str(r["unfreezes_at_step"]))
    trainable = sum(r["trainable"] for r in rows)
    total = trainable + sum(r["frozen"] for r in rows)
    table.caption = f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%)"
    console.print(table, soft_wrap=False)  # a table fits the console width (centred title), even in a log


_LAYER = re.compile(r"(.*)layer_(\d+)")
_ALIKE = ("trainable", "frozen", "lr", "unfreezes_at_step")


def collapse_layers(rows: Sequence[dict]) -> list[tuple[str, dict, int]]:
    """The parameter table's rows with each run of consecutive, alike layers as one.

    Returns:
        ``(part, row, n)`` per row: ``n`` layers share ``row``'s counts each; ``part`` names their range
        (``backbone/layer_00-05``) or, for one row, the row's own part.
    """
    out: list[tuple[str, dict, int]] = []
    previous = None  # (prefix, number) of the row before, when it is a layer
    for row in rows:
        match = _LAYER.fullmatch(row["group"])
        layer = (match.group(1), int(match.group(2))) if match else None
        if layer and previous and layer == (previous[0], previous[1] + 1) \
                and all(row[k] == out[-1][1][k] for k in _ALIKE):
            _, first, n = out[-1]
            out[-1] = (f"{first['group']}-{match.group(2)}", first, n + 1)
        else:
            out.append((row["group"], row, 1))
        previous = layer
    return out


def print_next_steps(console: Console, run_dir: str | Path, tasks: Sequence[str]) -> None:
    """Where a finished run's model and results are, and the commands that use them, with the run's own path
    and its first task (paths and names quoted for a POSIX shell), e.g.::

        model: runs/demo/model; results: runs/demo/results.json
        next: multitune evaluate runs/demo
              multitune predict runs/demo --task sentiment "some text"
              multitune report runs/demo    # writes runs/demo/report.html
              multitune export runs/demo --task sentiment --output runs/demo-sentiment
              multitune serve runs/demo
    """
    run = Path(run_dir)
    task = tasks[0] if tasks else "TASK"
    path, name, export = shlex.quote(str(run)), shlex.quote(task), shlex.quote(f"{run}-{task}")
    lines = [f"model: {run / 'model'}; results: {run / 'results.json'}",
             f"next: multitune evaluate {path}",
             f'      multitune predict {path} --task {name} "some text"',
             f"      multitune report {path}    # writes {run / 'report.html'}",
             f"      multitune export {path} --task {name} --output {export}",
             f"      multitune serve {path}"]
    for line in lines:  # never wrapped: each command stays one line to copy
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def fast_path_summary(precision: str, configured: str, native_bf16: bool, grouped: bool,
                      padding: float | None, other_padding: float | None,
                      word_embeddings: tuple[int, bool] = (0, False), unpadded: bool = False) -> str:
    """One line on the two settings that decide most of a step's cost, and what turning one off costs here.

    Args:
        precision: the resolved precision (fp32 or bf16).
        configured: ``training.precision`` as written (auto, fp32 or bf16).
        native_bf16: whether the device computes bf16 natively.
        grouped: ``training.group_by_length``.
        padding: the padding share of an epoch's training tokens as batched in this run.
        other_padding: the same with the other grouping setting.
        word_embeddings: the word-embedding parameters the default freezes on this backbone (0: none), and
            whether they are frozen in this run.
        unpadded: ``training.unpadded`` is on (the encoder's token-wise layers skip the padding).

    Example:
        >>> fast_path_summary("fp32", "fp32", True, False, 0.46, 0.08)
        'fast path: precision fp32 (this device computes bf16 natively: precision: auto would use it); length grouping off: 46% of training tokens are padding (8% with group_by_length: true)'
    """
    if precision == "bf16":
        parts = [f"bf16 autocast{' (precision: auto)' if configured == 'auto' else ''}"]
    elif native_bf16:
        parts = ["precision fp32 (this device computes bf16 natively: precision: auto would use it)"]
    else:
        parts = ["precision fp32 (this device has no native bf16)" if configured == "auto" else "precision fp32"]
    if padding is not None and other_padding is not None:
        if grouped:
            parts.append(f"length grouping: {padding:.0%} of training tokens are padding ({other_padding:.0%} "
                         f"without it)")
        else:
            parts.append(f"length grouping off: {padding:.0%} of training tokens are padding ({other_padding:.0%} "
                         f"with group_by_length: true)")
    words, frozen = word_embeddings
    if words:
        parts.append(f"word embeddings frozen ({words / 1e6:.1f}M parameters; freeze.word_embeddings: false "
                     f"trains them)" if frozen else
                     f"word embeddings train ({words / 1e6:.1f}M parameters; the default freezes them)")
    if unpadded:
        parts.append("encoder unpadded: embeddings, projections and feed-forward blocks skip the padding")
    return "fast path: " + "; ".join(parts)
