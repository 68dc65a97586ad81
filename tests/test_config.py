"""Config parsing: types, defaults, overrides, errors that name the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from multitune.config import load_config, parse_config
from multitune.config.loader import apply_overrides
from multitune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def base(tmp_path: Path) -> dict:
    f = tmp_path / "train.tsv"
    f.write_text("label\ttext\na\tx\n", encoding="utf-8")
    return {"tasks": {"s": {"type": "classification", "data": {"train": {"path": str(f)}}}},
            "output_dir": str(tmp_path / "out")}


def test_defaults_and_typed_sections(tmp_path):
    cfg = parse_config(base(tmp_path))
    assert cfg.backbone.name == "default" and cfg.backbone.type == "auto" and cfg.pooling is None
    assert cfg.training.max_steps == 1000 and cfg.training.scheduler == "linear"
    assert type(cfg.tasks["s"]).__name__ == "ClassificationConfig"
    assert cfg.sampling.strategy == "proportional" and cfg.loss_weighting.strategy == "sum"


@pytest.mark.parametrize("mutate, path, words", [
    (lambda d: d["tasks"]["s"].update(type="clasification"), "tasks.s.type", "did you mean 'classification'"),
    (lambda d: d.update(trainig={}), "trainig", "did you mean 'training'"),
    (lambda d: d.update(training={"learning_rate": 0}), "training.learning_rate", "greater than 0"),
    (lambda d: d.update(training={"learning_rate": -1e-5}), "training.learning_rate", "greater than 0"),
    (lambda d: d.update(training={"max_steps": "many"}), "training.max_steps", "expected an integer"),
    (lambda d: d.update(training={"max_steps": 10, "eval_every": 20}), "training.eval_every", "must not exceed"),
    (lambda d: d.update(pooling="avg"), "pooling", "expected one of: mean, cls, max"),
    (lambda d: d.update(sampling={"strategy": "temprature"}), "sampling.strategy", "did you mean 'temperature'"),
    (lambda d: d.update(sampling={"strategy": "temperature", "temperature": 0}), "sampling.temperature",
     "greater than 0"),
    (lambda d: d.update(loss_weighting={"strategy": "nope"}), "loss_weighting.strategy", "valid: cagrad, dwa"),
    (lambda d: d["tasks"]["s"]["data"]["train"].update(path="/no/such.tsv"), "tasks.s.data.train.path",
     "file not found"),
    (lambda d: d["tasks"]["s"]["data"]["train"].update(format="xls"), "tasks.s.data.train.format", "expected one of"),
    (lambda d: d["tasks"]["s"].pop("data"), "tasks.s.data", "required"),
    (lambda d: d["tasks"]["s"]["data"].pop("train"), "tasks.s.data.train", "required"),
    (lambda d: d.update(training={"early_stopping": {"metric": "other/accuracy"}}),
     "training.early_stopping.metric", "task of this run"),
    (lambda d: d["tasks"].update(r={"type": "regression", "label_range": [5, 0], "data": d["tasks"]["s"]["data"]}),
     "tasks.r.label_range", "low < high"),
    (lambda d: d.update(tasks={}), "tasks", "at least one task"),
])
def test_errors_name_the_field(tmp_path, mutate, path, words):
    data = base(tmp_path)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert err.value.path == path
    assert str(err.value).startswith(path + ":")
    assert words in str(err.value)


def test_overrides_are_yaml_typed():
    data = apply_overrides({"training": {"max_steps": 5}},
                           ["training.max_steps=100", "training.learning_rate=1e-4", "sampling.strategy=uniform",
                            "tasks.a.labels=[x, y]"])
    assert data["training"]["max_steps"] == 100
    assert data["sampling"] == {"strategy": "uniform"}
    assert data["tasks"]["a"]["labels"] == ["x", "y"]
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["training.max_steps"])


def test_relative_paths_resolve_against_base_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.tsv").write_text("label\ttext\na\tb\n", encoding="utf-8")
    cfg = parse_config({"tasks": {"s": {"type": "classification", "data": {"train": {"path": "d/t.tsv"}}}},
                        "output_dir": "runs/x"}, base_dir=tmp_path)
    assert cfg.tasks["s"].data.train.path == str(tmp_path / "d" / "t.tsv")
    assert cfg.output_dir == str(tmp_path / "runs" / "x")


def test_invalid_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  a: [1, 2\nseed: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    """Every shipped YAML validates (data files are checked only where ../shared/data exists)."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# multitune "), "each example opens with the command that runs it"
    shared = (REPO.parent / "shared" / "data").is_dir()
    cfg = load_config(path, base_dir=REPO, check_files=shared)
    assert cfg.tasks
    yaml.safe_dump({"ok": True})


def test_overrides_reach_into_lists():
    from multitune.config.loader import apply_overrides

    data = {"stages": [{"tasks": ["a"]}, {"tasks": ["b"], "replay": 0.2}]}
    assert apply_overrides(data, ["stages.1.replay=0.0"])["stages"][1]["replay"] == 0.0
    with pytest.raises(ConfigError, match=r"stages: has 2 entries, cannot set 'stages.5.replay'"):
        apply_overrides(data, ["stages.5.replay=0"])
    with pytest.raises(ConfigError, match=r"stages.0.tasks.0: is not a mapping"):
        apply_overrides(data, ["stages.0.tasks.0.x=1"])
