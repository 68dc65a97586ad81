"""predict and embed keep one output per input, in order, carrying the input; input forms are checked as the
server checks them (pair tasks take pairs, single-text tasks refuse them) in the CLI and the library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import multitune.model
from multitune.cli import main
from multitune.errors import InputError
from tests.conftest import toy_config, write, write_toy_data


@pytest.fixture(scope="module")
def run_dir(tiny_backbone, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("predict-io")
    toy_data = write_toy_data(tmp)
    cfg = tmp / "run.yaml"
    cfg.write_text(yaml.safe_dump(toy_config(toy_data, tiny_backbone, tmp / "run")), encoding="utf-8")
    assert main(["train", str(cfg), "--no-progress", "--set", "training.max_steps=2",
                 "--set", "training.eval_every=2"]) == 0
    return tmp / "run"


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the error
    return captured.err.strip().splitlines()[-1]


def test_one_output_line_per_input_line_in_order(run_dir, tmp_path, capsys):
    texts = ["a gripping film", "dull\tand long", "the cast was wonderful"]  # a TAB is part of a single text
    path = write(tmp_path / "in.txt", "\n".join(texts) + "\n")
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--task", "sentiment", "--input", str(path)]) == 0
    out = _lines(capsys)
    assert [o["input"] for o in out] == texts
    assert all("label" in o and "scores" in o for o in out)


def test_blank_line_is_an_error_naming_file_and_line(run_dir, tmp_path, capsys):
    path = write(tmp_path / "gaps.txt", "first review\n\nthird review\n")
    err = _error(capsys, ["predict", str(run_dir), "--task", "sentiment", "--input", str(path)])
    assert f"{path}:2: blank line" in err
    err = _error(capsys, ["embed", str(run_dir), "--input", str(path), "--output", str(tmp_path / "e.npy")])
    assert f"{path}:2: blank line" in err and not (tmp_path / "e.npy").exists()


def test_jsonl_ids_pass_through_and_empty_text_is_refused(run_dir, tmp_path, capsys):
    path = write(tmp_path / "in.jsonl", '{"id": "r-7", "text": "Anna Smith visited Oslo"}\n'
                                        '{"id": 8, "text": "nothing here"}\n')
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--task", "ner", "--input", str(path)]) == 0
    out = _lines(capsys)
    assert [o["id"] for o in out] == ["r-7", 8]
    assert out[0]["input"] == "Anna Smith visited Oslo"
    assert out[0]["tokens"] == ["Anna", "Smith", "visited", "Oslo"] and len(out[0]["tags"]) == 4
    for ent in out[0]["entities"]:  # character offsets into the input
        assert out[0]["input"][ent["start"]:ent["end"]] == ent["text"]
    empty = write(tmp_path / "empty.jsonl", '{"text": "fine"}\n{"text": "  "}\n')
    err = _error(capsys, ["predict", str(run_dir), "--task", "sentiment", "--input", str(empty)])
    assert f"{empty}:2.text: is empty" in err


def test_input_forms_are_checked_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(multitune.model, "load", no_load)
    err = _error(capsys, ["predict", str(run_dir), "--task", "similarity", "just one text"])
    assert "inputs[0]: task 'similarity' takes a text pair" in err and "--pairs tsv" in err
    err = _error(capsys, ["predict", str(run_dir), "--task", "sentiment", "--pairs", "tsv", "a\tb"])
    assert "inputs[0]: task 'sentiment' takes a single text, got a pair" in err
    path = write(tmp_path / "pairs.tsv", "a man plays\ta man is playing\nno tab on this line\n")
    err = _error(capsys, ["predict", str(run_dir), "--task", "similarity", "--pairs", "tsv", "--input", str(path)])
    assert f"{path}:2: no TAB" in err


def test_pairs_tsv_predicts_pairs(run_dir, capsys):
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--task", "similarity", "--pairs", "tsv",
                 "a man plays a guitar\ta man is playing a guitar"]) == 0
    (out,) = _lines(capsys)
    assert out["input"] == ["a man plays a guitar", "a man is playing a guitar"] and isinstance(out["score"], float)


def test_library_checks_input_forms(run_dir):
    model = multitune.load(run_dir)
    with pytest.raises(InputError, match=r"inputs\[0\]: task 'sentiment' takes a single text, got a pair"):
        model.predict("sentiment", [("a", "b")])
    with pytest.raises(InputError, match=r"inputs\[1\]: task 'similarity' takes a text pair"):
        model.predict("similarity", [("a", "b"), "just one"])
    with pytest.raises(InputError, match=r"inputs\[0\]\.text: is empty"):
        model.predict("sentiment", [""])
    with pytest.raises(InputError, match=r"texts\[1\]: is empty"):
        model.embed_texts(["fine", ""])
    assert len(model.predict("ner", ["Anna went home", "Bo stayed"])) == 2


def test_embed_jsonl_output_carries_id_and_text(run_dir, tmp_path, capsys):
    path = write(tmp_path / "t.jsonl", '{"id": 1, "text": "one text"}\n{"id": 2, "text": "another"}\n')
    out = tmp_path / "e.jsonl"
    assert main(["embed", str(run_dir), "--input", str(path), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["text"]) for r in rows] == [(1, "one text"), (2, "another")]
    assert np.isfinite(rows[0]["embedding"]).all()
    npy = tmp_path / "e.npy"
    assert main(["embed", str(run_dir), "--input", str(path), "--output", str(npy)]) == 0
    assert np.allclose(np.load(npy), np.array([r["embedding"] for r in rows]), atol=1e-5)


def test_library_load_is_quiet(run_dir, capfd):
    capfd.readouterr()
    multitune.load(run_dir)
    captured = capfd.readouterr()
    assert "Loading" not in captured.err and captured.out == ""
