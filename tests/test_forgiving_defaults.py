"""Forgiving, explained defaults for a newcomer: a setting that cannot work as written is either made to work
with a note (eval_every above max_steps) or refused with an error that says what to do instead (a data path
written relative to the config file, a TSV read as CSV, a hub id while offline, unlabelled rows)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from multitune.config import load_config, parse_config
from multitune.config.loader import stage_training
from multitune.config.schema import SplitConfig, SplitFractions, TaskDataConfig
from multitune.data import load_task_data, read_split
from multitune.errors import ConfigError, DataError
from tests.conftest import REPO, write

CLS_FIELDS, CLS_REQUIRED = ("text", "text_pair", "label"), ("text", "label")
WHERE = "tasks.t.data.train"


def _cls_rows(n: int) -> str:
    return "label\ttext\n" + "".join(f"{'pos' if i % 2 else 'neg'}\tsentence {i}\n" for i in range(n))


def _raw(train: str | Path, **top) -> dict:
    return {"tasks": {"t": {"type": "classification", "data": {"train": {"path": str(train)}}}}, **top}


# -- 1. eval_every above max_steps -------------------------------------------------------------------------

def test_eval_every_above_max_steps_is_lowered_with_one_note(tmp_path, caplog):
    train = write(tmp_path / "t.tsv", _cls_rows(4))
    with caplog.at_level(logging.WARNING, logger="multitune.config"):
        cfg = parse_config(_raw(train, training={"max_steps": 100}))  # eval_every: the default, 200
    assert cfg.training.eval_every == cfg.training.max_steps == 100
    notes = [r.getMessage() for r in caplog.records if r.name == "multitune.config"]
    assert notes == ["multitune: note: training.eval_every (200) is more than training.max_steps (100); "
                     "evaluating at the end of training only (step 100)"]
    caplog.clear()
    assert parse_config(_raw(train, training={"max_steps": 400})).training.eval_every == 200
    assert not caplog.records  # nothing to say when nothing changed


def test_a_stage_keeps_the_eval_every_the_config_asked_for(tmp_path):
    train = write(tmp_path / "t.tsv", _cls_rows(4))
    cfg = parse_config(_raw(train, training={"max_steps": 100, "eval_every": 200},
                            stages=[{"tasks": ["t"], "name": "long", "training": {"max_steps": 1000}},
                                    {"tasks": ["t"], "name": "short"}]))
    assert stage_training(cfg, 0).eval_every == 200  # lowered to the top-level max_steps, not to the stage's
    assert stage_training(cfg, 1).eval_every == 100


def test_the_note_reaches_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(write(tmp_path / "t.tsv", _cls_rows(4)), output_dir=str(tmp_path / "o"))))
    # --accept-changed-data without --resume stops the command right after the config has loaded
    done = subprocess.run([sys.executable, "-m", "multitune.cli", "train", str(config), "--set",
                           "training.max_steps=100", "--accept-changed-data"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.stderr.splitlines()[0] == ("multitune: note: training.eval_every (200) is more than "
                                           "training.max_steps (100); evaluating at the end of training only "
                                           "(step 100)"), done.stderr


# -- 2. one set of default split fractions -------------------------------------------------------------------

@pytest.mark.parametrize("split", [None, SplitFractions(), SplitFractions(validation=0.1)],
                         ids=["no split section", "empty split section", "split without test"])
def test_default_fractions_are_the_same_with_or_without_a_split_section(tmp_path, split):
    write(tmp_path / "t.tsv", _cls_rows(100))
    data = TaskDataConfig(train=SplitConfig(path="t.tsv"), split=split)
    got = load_task_data("t", data, tmp_path, 0, CLS_FIELDS, CLS_REQUIRED, "label")
    assert {s: len(e) for s, e in got.splits.items()} == {"train": 80, "validation": 10, "test": 10}


def test_a_test_fraction_of_zero_carves_no_test_split(tmp_path):
    write(tmp_path / "t.tsv", _cls_rows(100))
    data = TaskDataConfig(train=SplitConfig(path="t.tsv"), split=SplitFractions(test=0.0))
    assert set(load_task_data("t", data, tmp_path, 0, CLS_FIELDS, CLS_REQUIRED).splits) == {"train", "validation"}


# -- 3. relative data paths ----------------------------------------------------------------------------------

def _config_beside_data(tmp_path: Path) -> Path:
    """configs/run.yaml names ../data/reviews.csv, which is there relative to the config file."""
    write(tmp_path / "data" / "reviews.csv", "label,text\npos,good\nneg,bad\n")
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "run.yaml"
    config.write_text(yaml.safe_dump(_raw("../data/reviews.csv")), encoding="utf-8")
    return config


def test_a_path_relative_to_the_config_file_is_suggested(tmp_path, monkeypatch):
    config = _config_beside_data(tmp_path)
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    configs = tmp_path / "configs"
    assert str(err.value) == (
        f"{WHERE}.path: file not found: ../data/reviews.csv (looked in {elsewhere}/../data/reviews.csv; it exists "
        f"relative to the config file's folder: {configs}/../data/reviews.csv -- run from {configs} or write the "
        f"path relative to the current directory) (in {config})")
    monkeypatch.chdir(configs)  # from the config's folder the same config loads
    assert load_config(config).tasks["t"].data.train.path == str(tmp_path / "data" / "reviews.csv")


def test_a_missing_relative_path_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw("data/gone.csv")), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{WHERE}.path: file not found: data/gone.csv \(looked in "
                                          rf"{tmp_path}/data/gone.csv\) \(in "):
        load_config(config)
    with pytest.raises(ConfigError, match=rf"file not found: data/gone.csv \(looked in {tmp_path}/data/gone.csv\)$"):
        parse_config(_raw("data/gone.csv"))  # plain data: no config file to look beside
    with pytest.raises(ConfigError, match=rf"file not found: {tmp_path}/gone.csv$"):
        parse_config(_raw(tmp_path / "gone.csv"))  # an absolute path is where it looked


# -- 4. a TSV read as CSV, and the reverse -------------------------------------------------------------------

def _read(tmp_path: Path, name: str, content: str, **spec) -> list[dict]:
    write(tmp_path / name, content)
    return read_split(SplitConfig(path=name, **spec), tmp_path, "train", WHERE, CLS_FIELDS, CLS_REQUIRED)


def test_tsv_read_as_csv_suggests_format_tsv(tmp_path):
    with pytest.raises(DataError) as err:  # a comma in a text: two fields where the header has one
        _read(tmp_path, "r.csv", "review\tsentiment\ngood, fun\tpos\n", text="review", label="sentiment")
    assert str(err.value) == ("r.csv:2: expected 1 fields, found 2 (columns: review\tsentiment; delimiter ','); "
                              "the header has tabs and no commas: set format: tsv to read it as TSV")
    with pytest.raises(DataError, match=r"^r.csv:2: no column 'review' .*; the header has tabs and no commas: "
                                        r"set format: tsv"):  # no comma anywhere: the columns are not found
        _read(tmp_path, "r.csv", "review\tsentiment\ngood\tpos\n", text="review", label="sentiment")
    with pytest.raises(DataError, match=r"^r.csv:1: expected 2 fields, found 1 .*; split at tabs, this row has the "
                                        r"2 fields expected: set format: tsv"):
        _read(tmp_path, "r.csv", "good\tpos\n", header=False, columns=["text", "label"])
    rows = _read(tmp_path, "r.csv", "review\tsentiment\ngood\tpos\n", format="tsv", text="review", label="sentiment")
    assert [(r["text"], r["label"]) for r in rows] == [("good", "pos")]


def test_csv_read_as_tsv_suggests_format_csv(tmp_path):
    with pytest.raises(DataError, match=r"^r.tsv:2: missing column 'text'.*; the header has commas and no tabs: "
                                        r"set format: csv to read it as CSV$"):
        _read(tmp_path, "r.tsv", "text,label\ngood,pos\n")
    with pytest.raises(DataError, match=r"^r.tsv:2: expected 1 fields, found 2 .*set format: csv"):
        _read(tmp_path, "r.tsv", "text,label\ngood\tfun,pos\n")


def test_no_format_hint_with_a_delimiter_setting_or_a_real_mismatch(tmp_path):
    with pytest.raises(DataError) as err:
        _read(tmp_path, "r.csv", "text;label\ngood;pos;x\n", delimiter=";")
    assert "set format" not in str(err.value)
    with pytest.raises(DataError) as err:
        _read(tmp_path, "r.csv", "text,label\ngood,pos,extra\n")
    assert "set format" not in str(err.value)


# -- 5. a hub id while offline -------------------------------------------------------------------------------

def test_a_hub_id_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    from multitune.backbones import load_backbone

    if not huggingface_hub.constants.HF_HUB_OFFLINE:  # conftest sets it before anything imports the hub
        pytest.skip("the hub is not in offline mode: the test would use the network")
    with pytest.raises(ConfigError) as err:
        load_backbone("nobody-has-this/model-xyz")
    assert str(err.value) == (
        "backbone.name: 'nobody-has-this/model-xyz' is not a local model directory and not in the Hugging Face "
        "cache, and HF_HUB_OFFLINE=1 is set, which forbids downloading it: unset HF_HUB_OFFLINE (or run once "
        "online to cache the model), or give a local model directory")
    # without the variable (the hub read it when imported, so this stays offline) the hub was not reachable
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match=r"^backbone.name: 'nobody-has-this/model-xyz' is not a local model "
                                          r"directory .* the Hugging Face Hub could not be reached"):
        load_backbone("nobody-has-this/model-xyz")


def test_a_missing_model_directory_is_not_taken_for_a_hub_id(tmp_path):
    from multitune.backbones import load_backbone

    with pytest.raises(ConfigError, match=rf"^backbone.name: model directory not found: {tmp_path}/gone$"):
        load_backbone(str(tmp_path / "gone"))


# -- 6. quiet loads ------------------------------------------------------------------------------------------

def test_loading_a_backbone_prints_nothing_and_restores_the_settings(tiny_backbone, capsys):
    from transformers.utils import logging as hf_logging

    from multitune.backbones import load_backbone

    hf_logging.enable_progress_bar()
    before = hf_logging.get_verbosity()
    capsys.readouterr()
    load_backbone(tiny_backbone)
    captured = capsys.readouterr()
    assert "Loading" not in captured.err and "LOAD REPORT" not in captured.err, captured.err
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == before


# -- 8. unlabelled rows --------------------------------------------------------------------------------------

def test_missing_class_labels_are_counted_with_their_lines():
    datasets = pytest.importorskip("datasets")

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    labels = [0, -1, 1, -1, -1, 0, -1, -1, -1, -1]
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)], "label": labels}, features=features)
    with pytest.raises(DataError) as err:
        read_split(SplitConfig(dataset=ds), Path("."), "train", WHERE, CLS_FIELDS, CLS_REQUIRED)
    assert str(err.value) == ("<Dataset train>:2: label: -1 is how a ClassLabel marks a missing label (an unlabelled "
                              "split); 7 rows have no label: lines 2, 4, 5, 7, 8 and 2 more; expected one of 0..1 "
                              "('neg, pos')")
