"""Progress bar with the current task losses, evaluation lines and the final metrics table."""

from __future__ import annotations

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


class TrainingProgress:
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
    console.print(table)
    tr = results.get("train", {})
    if tr:
        console.print(f"{tr['steps']} steps in {tr['wall_s']:.1f}s, {tr['examples_per_s']:.1f} examples/s, "
                      f"{tr['real_tokens_per_s']:.0f} real tokens/s ({tr['padded_tokens_per_s']:.0f} padded), "
                      f"best step {tr['best_step']}")


def print_parameter_table(console: Console, rows: list[dict]) -> None:
    """Trainable and frozen parameter counts per part of the model and the learning rate each part gets."""
    table = Table(title="parameters", show_lines=False)
    for col in ("part", "trainable", "frozen", "lr", "unfreezes at step"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for r in rows:
        table.add_row(r["group"], f"{r['trainable']:,}", f"{r['frozen']:,}",
                      "-" if r["lr"] is None else f"{r['lr']:.3g}",
                      "-" if r["unfreezes_at_step"] is None else str(r["unfreezes_at_step"]))
    trainable = sum(r["trainable"] for r in rows)
    total = trainable + sum(r["frozen"] for r in rows)
    table.caption = f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%)"
    console.print(table)
