"""Config parsing: types, defaults, overrides, errors that name the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from multitune.config import load_config, parse_config
from multitune.config.loader import apply_overrides
from multitune.config.parse import to_dict
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


def test_eval_every_above_max_steps_is_lowered_with_a_note(tmp_path, caplog):
    data = base(tmp_path)
    data["training"] = {"max_steps": 10, "eval_every": 20}
    cfg = parse_config(data)
    assert cfg.training.eval_every == 10
    assert ("training.eval_every (20) is more than training.max_steps (10); evaluating at the end of training only "
            "(step 10)") in caplog.text
    assert to_dict(cfg)["training"]["eval_every"] == 10 and "requested_eval_every" not in to_dict(cfg)["training"]


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


# -- bounds on what a config file may turn into ------------------------------------------------------------

def _laughs(levels: int, width: int = 9) -> str:
    """A "billion laughs": each list holds ``width`` aliases of the one before (width**levels strings)."""
    names = [f"l{i}" for i in range(levels)]
    rows = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    rows += [f"{b}: &{b} [{', '.join([f'*{a}'] * width)}]" for a, b in zip(names, names[1:])]
    return "\n".join(rows) + "\n"


def test_aliases_that_stand_for_too_many_values_are_refused_at_their_line():
    from multitune.config.safe_yaml import load_yaml

    assert len(load_yaml(_laughs(4), "c.yaml")["l3"]) == 9  # 9**4 values in all: a config may share that much
    with pytest.raises(ConfigError, match=r"^c\.yaml:6: aliases stand for more than 100,000 values"):
        load_yaml(_laughs(9), "c.yaml")


def test_shared_sections_still_load():
    from multitune.config.safe_yaml import load_yaml

    text = ("defaults: &d {type: classification, labels: [a, b]}\n"
            "tasks:\n  x: {<<: *d, data: {train: {path: x.tsv}}}\n  y: {<<: *d, labels: [c]}\n  z: *d\n")
    data = load_yaml(text, "c.yaml")
    assert data["tasks"]["x"]["labels"] == ["a", "b"] and data["tasks"]["y"]["labels"] == ["c"]
    assert data["tasks"]["z"] == data["defaults"]


@pytest.mark.parametrize("text, line", [
    ("a: " + "[" * 101 + "]" * 101 + "\n", 1),
    ("a:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(150)), 100),
    # 60 levels, then an alias of another 60 levels: deeper than either alone
    ("deep: &d " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 60 + "*d" + "]" * 60 + "\n", 2),
])
def test_nesting_past_the_limit_is_refused_at_its_line(text, line):
    from multitune.config.safe_yaml import load_yaml

    with pytest.raises(ConfigError, match=rf"^c\.yaml:{line}: values are nested more than 100 levels deep"):
        load_yaml(text, "c.yaml")
    load_yaml("a: " + "[" * 99 + "]" * 99 + "\n", "c.yaml")  # 100 levels with the mapping: the limit


def test_a_recursive_alias_is_refused():
    from multitune.config.safe_yaml import load_yaml

    with pytest.raises(ConfigError, match=r"^c\.yaml:2: alias \*a refers to a value that contains it"):
        load_yaml("x: &a\n  - *a\n", "c.yaml")


def test_the_config_file_size_is_capped(tmp_path):
    from multitune.config.safe_yaml import MAX_CONFIG_BYTES, read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n" + "#" * (MAX_CONFIG_BYTES - 5))
    assert read_yaml(path) == {"a": 1}
    with path.open("a") as f:
        f.write("#")
    with pytest.raises(ConfigError, match=r"c\.yaml: the config file is 1\.0 MB; a config is at most 1 MB"):
        read_yaml(path)


def test_overrides_are_read_with_the_same_bounds():
    with pytest.raises(ConfigError, match=r"^--set: 'a': values are nested more than 100 levels"):
        apply_overrides({}, ["a=" + "[" * 200 + "]" * 200])
    with pytest.raises(ConfigError, match=r"^--set: .* is more than 100 levels deep"):
        apply_overrides({}, [".".join(["k"] * 101) + "=1"])


@pytest.mark.parametrize("seed, ok", [(0, True), (2**32 - 1, True), (-5, False), (2**32, False), (1.0e23, False)])
def test_seeds_are_32_bit(tmp_path, seed, ok):
    data = {**base(tmp_path), "seed": seed}
    if ok:
        assert parse_config(data).seed == seed
    else:
        with pytest.raises(ConfigError, match=r"^seed: must be at (least 0|most 4294967295), got"):
            parse_config(data)


def test_messages_show_a_huge_value_cut_short(tmp_path):
    data = {**base(tmp_path), "training": {"max_steps": ["x" * 1000] * 1000}}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value) == "training.max_steps: expected an integer, got <list of 1000 items>"
    data["training"]["max_steps"] = "y" * 10_000
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert len(str(err.value)) < 300 and "(10002 chars)" in str(err.value)
