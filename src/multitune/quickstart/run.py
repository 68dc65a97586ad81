"""``multitune quickstart``: sentiment + NER + similarity on bundled data, one shared MiniLM, offline."""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console

from multitune.config.loader import parse_config
from multitune.fileio import write_text_atomic
from multitune.model import load
from multitune.quickstart.data import write_quickstart_data
from multitune.training import train
from multitune.training.progress import print_next_steps, stderr_console

QUICKSTART_STEPS = 300

EXAMPLES = {
    "sentiment": ["the soup was cold and the waiter ignored us all evening",
                  "an absolute delight from start to finish, I would watch it again"],
    "ner": ["Amelia Brandt flew from Porto to Helsinki to meet the board of Corvina Systems ."],
    "similarity": [("a man is playing a guitar on the stage", "a musician performs a song with his guitar"),
                   ("a man is playing a guitar on the stage", "the train to the airport was delayed")],
}


def quickstart_config(data: dict[str, dict[str, Path]], output_dir: Path, steps: int) -> dict:
    """The quickstart's run config (also written to OUTPUT_DIR/quickstart.yaml for the user to edit)."""
    return {
        "backbone": "default", "pooling": "mean", "output_dir": str(output_dir), "seed": 42,
        "tasks": {
            "sentiment": {"type": "classification", "data": {
                s: {"path": str(data["sentiment"][s]), "format": "tsv", "text": "sentence", "label": "label"}
                for s in ("train", "validation")}},
            "ner": {"type": "token_classification", "data": {
                s: {"path": str(data["ner"][s]), "format": "conll"} for s in ("train", "validation")}},
            "similarity": {"type": "regression", "label_range": [0, 5], "data": {
                s: {"path": str(data["similarity"][s]), "format": "csv", "header": False,
                    "columns": ["text", "text_pair", "label"]} for s in ("train", "validation")}},
        },
        "sampling": {"strategy": "temperature", "temperature": 2.0},
        "loss_weighting": {"strategy": "uncertainty"},
        "training": {"max_steps": steps, "batch_size": 16, "max_length": 64, "learning_rate": 8e-5,
                     "head_learning_rate": 2e-3, "warmup_ratio": 0.1, "scheduler": "linear",
                     "eval_every": max(1, steps // 3)},  # precision and length grouping: the defaults
    }


def run_quickstart(output_dir: Path, steps: int | None = None, progress: bool = True,
                   console: Console | None = None) -> dict:
    """Generate the bundled data, train, and print metrics, a few predictions and the next commands.

    Returns:
        The run's results (``results.json``).
    """
    console = console or stderr_console()
    output_dir = output_dir.resolve()
    data_dir = output_dir.parent / f"{output_dir.name}-data"
    data = write_quickstart_data(data_dir)
    raw = quickstart_config(data, output_dir, steps or QUICKSTART_STEPS)
    config = parse_config(raw)
    console.print(f"[bold]multitune quickstart[/]: 3 tasks on the packaged MiniLM backbone; data in {data_dir}")
    results = train(config, overwrite=True, console=console, progress=progress)
    write_text_atomic(output_dir / "quickstart.yaml",
                      "# multitune train " + str(output_dir / "quickstart.yaml") + " --overwrite\n"
                      + yaml.safe_dump(raw, sort_keys=False))
    model = load(output_dir)
    console.print("[bold]a few predictions[/]:")
    for task, inputs in EXAMPLES.items():
        for text, pred in zip(inputs, model.predict(task, inputs)):
            shown = {k: v for k, v in pred.items() if k not in ("scores", "tags", "tokens")}
            console.print(f"  [cyan]{task}[/] {text!r} -> {shown}")
    print_next_steps(console, output_dir, list(EXAMPLES))
    return results
