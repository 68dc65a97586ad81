"""The multitune command: every subcommand end to end, and bad input as one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from multitune.cli import main
from tests.conftest import toy_config, write


@pytest.fixture()
def run_dir(tiny_backbone, toy_data, tmp_path) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(toy_config(toy_data, tiny_backbone, tmp_path / "run")), encoding="utf-8")
    assert main(["train", str(cfg), "--no-progress", "--set", "training.max_steps=4",
                 "--set", "training.eval_every=2"]) == 0
    return tmp_path / "run"


def test_train_evaluate_predict_embed(run_dir, capsys, tmp_path):
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == 4  # --set landed in the resolved config
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    results = json.loads((run_dir / "results.json").read_text())
    assert out["test"]["sentiment"] == pytest.approx(results["test"]["sentiment"])
    assert main(["predict", str(run_dir), "--task", "ner", "Anna Smith visited Oslo today"]) == 0
    pred = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "entities" in pred and len(pred["tags"]) == 5
    inputs = write(tmp_path / "in.jsonl", '{"text": "the film was great", "text_pair": "the film was lovely"}\n')
    assert main(["predict", str(run_dir), "--task", "similarity", "--input", str(inputs)]) == 0
    assert "score" in json.loads(capsys.readouterr().out)
    texts = write(tmp_path / "t.txt", "one text\nanother text\n")
    assert main(["embed", str(run_dir), "--input", str(texts), "--output", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 32)


def _bad(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("multitune: error:")]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err  # one line, and the last one
    return errors[0]


def test_bad_inputs_are_one_line(tiny_backbone, toy_data, tmp_path, capsys, run_dir, monkeypatch):
    capsys.readouterr()  # drop the fixture's training log
    def cfg_with(mutate) -> str:
        raw = toy_config(toy_data, tiny_backbone, tmp_path / "bad-out")
        mutate(raw)
        p = tmp_path / f"bad{len(list(tmp_path.glob('bad*.yaml')))}.yaml"
        p.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return str(p)

    bad_label = write(tmp_path / "lab.tsv", "label\tsentence\npositive\tx\nnegative\ty\n")
    bad_score = write(tmp_path / "score.csv", "a,b,1.0\nc,d,oops\n")
    cases = [
        (cfg_with(lambda r: r["tasks"]["ner"]["data"]["train"].update(path="missing.conll")),
         "tasks.ner.data.train.path: file not found"),
        (cfg_with(lambda r: r["training"].update(learning_rate=-1)), "training.learning_rate: must be greater"),
        (cfg_with(lambda r: r.update(backbone=str(tmp_path))), "backbone.name: "),
        (cfg_with(lambda r: r["tasks"]["sentiment"].update(labels=["good", "bad"], data={"train": {
            "path": str(bad_label), "text": "sentence"}})), "lab.tsv:2: label 'positive' is not in the label set"),
        (cfg_with(lambda r: r["tasks"]["similarity"]["data"]["train"].update(path=str(bad_score))),
         "score.csv:2: label must be a number, got 'oops'"),
    ]
    for path, expected in cases:
        err = _bad(capsys, ["train", path, "--no-progress"])
        assert expected in err, err
        assert not (tmp_path / "bad-out").exists()  # validation failed before anything was written
    assert "has no task 'nope'; its tasks:" in _bad(capsys, ["predict", str(run_dir), "--task", "nope", "x"])
    assert "not a multitune model directory" in _bad(capsys, ["predict", str(tmp_path), "--task", "a", "x"])
    assert f"{tmp_path / 'nowhere'}: does not exist" in _bad(capsys, ["predict", str(tmp_path / "nowhere"),
                                                                      "--task", "a", "x"])
    assert "is not empty; pass --overwrite" in _bad(capsys, ["train", str(run_dir / "config.yaml")])

    import multitune.model  # a misspelt task is refused before the model loads (which takes seconds)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(multitune.model, "load", no_load)
    err = _bad(capsys, ["predict", str(run_dir), "--task", "sentimnt", "a film"])
    assert "has no task 'sentimnt' (did you mean 'sentiment'?); its tasks: mlm, ner, sentiment, similarity" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "multitune.cli", "tasks"], capture_output=True, text=True, check=True)
    assert "classification" in out.stdout and "round_robin" in out.stdout and "uncertainty" in out.stdout

