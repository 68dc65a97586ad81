"""What ``multitune train`` shows: plain loss lines without the live bar, lines that a log file does not wrap at
80 columns, a parameter table with alike layers on one row, and the next commands with the run's own paths."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import yaml
from rich.console import Console

from multitune.cli import main
from multitune.training.progress import (
    LOG_WIDTH,
    collapse_layers,
    print_next_steps,
    print_parameter_table,
    stderr_console,
)
from tests.conftest import toy_config

LOSS_LINE = re.compile(r"step (\d+)/8: loss ((?:\w+=\d+\.\d{4} ?)+) \| lr (\S+)")


def test_cli_train_without_progress_logs_losses_unwrapped_and_the_next_commands(tiny_backbone, toy_data, tmp_path,
                                                                               capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = tmp_path / "my run"
    raw = toy_config(toy_data, tiny_backbone, out, log_every=2)
    raw["tasks"] = {n: raw["tasks"][n] for n in ("sentiment", "ner", "similarity")}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["train", str(cfg), "--no-progress"]) == 0
    err = capsys.readouterr().err.splitlines()

    # one plain line of mean losses every training.log_every (2) steps, the same numbers as metrics.jsonl
    losses = [m for m in map(LOSS_LINE.fullmatch, err) if m]
    assert [int(m.group(1)) for m in losses] == [2, 4, 6, 8]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in logged if r["kind"] == "train"]
    for m, record in zip(losses, trains):
        shown = dict(pair.split("=") for pair in m.group(2).split())
        assert shown == {n: f"{v:.4f}" for n, v in record["loss"].items()}
        assert float(m.group(3)) == float(f"{record['lr']:.3g}")
    # an evaluation is one line (longer than 80 columns: a log file does not wrap it)
    evals = [line for line in err if re.match(r"step \d+: ", line)]
    assert len(evals) == 2 and all("| selection=" in line for line in evals) and max(map(len, evals)) > 80
    # alike layers share a row of the parameter table
    assert any(re.search(r"backbone/layer_00-01 +│ +\d[\d,]* each", line) for line in err)
    # where the model and results are, and the next commands with this run's path (quoted) and first task
    path = f"'{out}'"
    assert err[-6:] == [f"model: {out / 'model'}; results: {out / 'results.json'}",
                        f"next: multitune evaluate {path}",
                        f'      multitune predict {path} --task sentiment "some text"',
                        f"      multitune report {path}    # writes {out / 'report.html'}",
                        f"      multitune export {path} --task sentiment --output '{out}-sentiment'",
                        f"      multitune serve {path}"]


def test_a_console_that_is_not_a_terminal_does_not_wrap(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    console = stderr_console()  # pytest captures stderr: not a terminal
    assert not console.is_terminal and console.width == LOG_WIDTH and console.soft_wrap
    console.print("word " * 60)
    assert len(capsys.readouterr().err.rstrip("\n").splitlines()) == 1
    monkeypatch.setenv("COLUMNS", "100")
    assert stderr_console().width == 100  # the user's COLUMNS wins


def row(group: str, trainable: int, frozen: int = 0, lr: float | None = 1e-3, unfreezes: int | None = None):
    return {"group": group, "trainable": trainable, "frozen": frozen, "lr": lr, "unfreezes_at_step": unfreezes}


def test_alike_consecutive_layers_share_one_row():
    layers = [row(f"backbone/layer_{i:02d}", 1_774_464) for i in range(6)]
    rows = [row("backbone/embeddings", 11_720_448), *layers, row("backbone/top", 0, 148_224, None),
            row("heads/sentiment", 770)]
    assert [(part, n) for part, _, n in collapse_layers(rows)] == [
        ("backbone/embeddings", 1), ("backbone/layer_00-05", 6), ("backbone/top", 1), ("heads/sentiment", 1)]

    # a layer with another learning rate (layer-wise decay) or unfreezing step ends a run; so does a gap
    decayed = [*layers[:3], {**layers[3], "lr": 5e-4}, *layers[4:]]
    assert [p for p, _, _ in collapse_layers(decayed)] == ["backbone/layer_00-02", "backbone/layer_03",
                                                           "backbone/layer_04-05"]
    unfreezing = [row(f"backbone/layer_{i:02d}", 10, unfreezes=100 * (6 - i)) for i in range(6)]
    assert len(collapse_layers(unfreezing)) == 6
    assert [p for p, _, _ in collapse_layers([layers[0], layers[2]])] == ["backbone/layer_00", "backbone/layer_02"]

    text = io.StringIO()
    print_parameter_table(Console(file=text, width=200), rows)
    lines = text.getvalue().splitlines()
    assert sum("layer_" in line for line in lines) == 1
    assert re.search(r"│ backbone/layer_00-05 +│ +1,774,464 each │ +0 │ +0\.001 │", text.getvalue())
    assert re.search(r"│ backbone/top +│ +0 │ +148,224 │", text.getvalue())
    total = sum(r["trainable"] + r["frozen"] for r in rows)  # the caption counts every layer
    assert f"of {total:,} parameters train" in text.getvalue()


def test_next_commands_quote_the_run_path(tmp_path):
    text = io.StringIO()
    print_next_steps(Console(file=text, width=40), Path("runs/a b"), ["ner", "sentiment"])
    lines = text.getvalue().splitlines()
    assert len(lines) == 6  # never wrapped, even at 40 columns
    assert lines[2] == "      multitune predict 'runs/a b' --task ner \"some text\""
    assert lines[4] == "      multitune export 'runs/a b' --task ner --output 'runs/a b-ner'"
