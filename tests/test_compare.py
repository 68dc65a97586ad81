"""`multitune compare`: the multi-task run against each task alone with the same budget per task; its files;
task groups from a hand-made affinity matrix; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from multitune.analysis.compare import (
    _partitions,
    compare,
    default_affinity_every,
    grouping_table,
    single_task_config,
    single_task_steps,
    suggest_groups,
)
from multitune.cli import main
from multitune.config import parse_config
from multitune.errors import ConfigError, MultituneError
from tests.conftest import toy_config


def two_tasks(toy_data, backbone, out, **training) -> dict:
    raw = toy_config(toy_data, backbone, out, **{"max_steps": 6, "eval_every": 3, "batch_size": 4,
                                                  "max_length": 16, **training})
    raw["tasks"] = {t: raw["tasks"][t] for t in ("sentiment", "ner")}
    return raw


def test_compare_command_writes_its_files_with_equal_budgets(tiny_backbone, toy_data, tmp_path, capsys):
    """Round robin over 2 tasks for 6 steps: 3 batches of each task, so each single-task run makes 3 steps."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(two_tasks(toy_data, tiny_backbone, tmp_path / "run")), encoding="utf-8")
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["compare", str(config), "--output", str(out), "--no-progress", "--set", "seed=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["compare"] == str(out / "compare.json") and set(printed["validation"]) == {"sentiment", "ner"}
    for name in ("compare.json", "compare.md", "compare.png", "affinity.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "compare.json").read_text())
    tasks = report["tasks"]
    assert sorted(tasks) == ["ner", "sentiment"] and report["seed"] == 3
    multi = json.loads((out / "multitask" / "results.json").read_text())
    assert multi["train"]["batches"] == {"ner": 3, "sentiment": 3}
    for task in tasks:
        single = json.loads((out / f"single-{task}" / "results.json").read_text())
        assert single["train"]["steps"] == 3 and single["train"]["batches"][task] == 3
        assert list(single["validation"]) == [task]  # trained and evaluated alone
        assert report["budget"]["tasks"][task] == {"multitask_batches": 3, "single_steps": 3, "single_batches": 3,
                                                   "run": f"single-{task}"}
        row = report["validation"][task]
        assert row["multitask"] == multi["validation"][task][row["metric"]]
        assert row["single"] == single["validation"][task][row["metric"]]
        assert row["delta"] == pytest.approx(row["multitask"] - row["single"])
        assert row["transfer"] == ("positive" if row["delta"] > 0 else "negative" if row["delta"] < 0 else "none")
        saved = yaml.safe_load((out / f"single-{task}" / "config.yaml").read_text())
        assert saved["analysis"]["affinity_every"] == 0 and saved["loss_weighting"]["strategy"] == "sum"
    assert report["runs"]["multitask"]["steps"] == 6
    # affinity sampled in the multi-task run though the config left it off
    assert report["transfer"]["samples"] == 6 // default_affinity_every(6) and report["transfer"] == multi["transfer"]
    assert "groups" not in report  # two tasks: nothing to group
    md = (out / "compare.md").read_text()
    assert "| task | metric | multi-task | single-task | delta | transfer |" in md and "Look-ahead affinity" in md
    # a second compare into the same directory needs --overwrite
    assert main(["compare", str(config), "--output", str(out), "--no-progress"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err


def test_budget_follows_the_strategy_and_accumulation(tiny_backbone, toy_data, tmp_path):
    """PCGrad takes one batch of every task per step: with 3 steps of 2 accumulated micro-steps every task gets 6
    batches, and each single-task run 3 steps of 2. The config's own affinity setting is kept; with 3 tasks the
    report suggests groups."""
    raw = two_tasks(toy_data, tiny_backbone, tmp_path / "run", max_steps=3, eval_every=3,
                    gradient_accumulation_steps=2)
    full = toy_config(toy_data, tiny_backbone, tmp_path / "run")
    raw["tasks"]["similarity"] = full["tasks"]["similarity"]
    raw["loss_weighting"] = {"strategy": "pcgrad"}
    raw["analysis"] = {"affinity_every": 3}
    report = compare(parse_config(raw), tmp_path / "cmp", progress=False)
    for task in ("sentiment", "ner", "similarity"):
        assert report["budget"]["tasks"][task] == {"multitask_batches": 6, "single_steps": 3, "single_batches": 6,
                                                   "run": f"single-{task}"}
    assert report["transfer"]["samples"] == 1
    groups = report["groups"]
    assert set(groups["by_max_groups"]) == {"1", "2", "3"}
    assert groups["suggested"] == suggest_groups(report["transfer"]["tag"])
    assert "Suggested task groups" in (tmp_path / "cmp" / "compare.md").read_text()


def test_partitions_are_enumerated_once_each():
    bell = [1, 1, 2, 5, 15, 52, 203]
    for n, count in enumerate(bell):
        parts = list(_partitions([f"t{i}" for i in range(n)]))
        assert len(parts) == count
        assert len({tuple(sorted(tuple(sorted(g)) for g in p)) for p in parts}) == count


def test_grouping_on_a_hand_made_affinity_matrix():
    """a and b help each other, c and d help each other, the two pairs hurt each other; d hurts a badly."""
    z = {"a": {"a": 1.0, "b": 0.4, "c": -0.1, "d": -0.5},
         "b": {"a": 0.2, "b": 1.0, "c": -0.1, "d": 0.0},
         "c": {"a": -0.2, "b": 0.0, "c": 1.0, "d": 0.3},
         "d": {"a": -0.3, "b": -0.1, "c": 0.1, "d": 1.0}}
    best = suggest_groups(z)
    assert best == {"groups": [["a", "b"], ["c", "d"]], "score": pytest.approx(0.6 + 0.4)}
    # one group: everything together, the sum of every pair
    together = suggest_groups(z, 1)
    assert together["groups"] == [["a", "b", "c", "d"]]
    assert together["score"] == pytest.approx(0.6 - 0.3 - 0.8 - 0.1 - 0.1 + 0.4)
    table = grouping_table(z)
    assert table["2"] == table["3"] == table["4"] == best  # more groups allowed, the same best partition
    # ties go to fewer groups: with all affinities 0, one group
    flat = {t: {u: 0.0 for u in "xyz"} for t in "xyz"}
    assert suggest_groups(flat)["groups"] == [["x", "y", "z"]]
    # undefined affinities count as 0; negative ones split everything up
    apart = {"x": {"y": None, "z": -1.0}, "y": {"x": -1.0, "z": -1.0}, "z": {"x": -1.0, "y": -1.0}}
    assert suggest_groups(apart)["groups"] == [["x"], ["y"], ["z"]]
    with pytest.raises(ValueError, match="at most 10 tasks"):
        suggest_groups({f"t{i}": {} for i in range(11)})


def test_single_task_config_and_budget(toy_data, tmp_path):
    raw = toy_config(toy_data, "default", tmp_path / "run", max_steps=100, eval_every=50,
                     early_stopping={"metric": "ner/f1", "patience": 2})
    raw["loss_weighting"] = {"strategy": "uncertainty"}
    raw["analysis"] = {"affinity_every": 10}
    config = parse_config(raw)
    single = single_task_config(config, "sentiment", 20, tmp_path / "single")
    assert single.training.max_steps == 20 and single.training.eval_every == 20
    assert single.training.early_stopping.metric == "mean" and single.training.early_stopping.patience == 2
    assert single.loss_weighting.strategy == "sum" and single.sampling.strategy == "proportional"
    assert single.analysis.affinity_every == 0 and single.output_dir == str(tmp_path / "single")
    assert single_task_config(config, "ner", 20, tmp_path / "s").training.early_stopping.metric == "ner/f1"
    assert config.training.max_steps == 100 and config.analysis.affinity_every == 10  # not changed in place
    assert single_task_steps(7, 2) == 4 and single_task_steps(6, 1) == 6
    assert default_affinity_every(400) == 20 and default_affinity_every(5) == 1


def test_compare_refusals(toy_data, tmp_path):
    raw = toy_config(toy_data, "default", tmp_path / "run")
    one = {**raw, "tasks": {"sentiment": raw["tasks"]["sentiment"]}}
    with pytest.raises(ConfigError, match="tasks: compare needs at least two tasks"):
        compare(parse_config(one), tmp_path / "cmp")
    staged = {**raw, "stages": [{"tasks": ["sentiment", "ner"]}, {"tasks": ["similarity", "mlm"]}]}
    with pytest.raises(ConfigError, match="stages: compare trains one multi-task run"):
        compare(parse_config(staged), tmp_path / "cmp")
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "keep.txt").write_text("x")
    with pytest.raises(MultituneError, match="is not empty and was not written by multitune"):
        compare(parse_config(raw), tmp_path / "cmp")
    assert (tmp_path / "cmp" / "keep.txt").is_file()
    assert not Path(raw["output_dir"]).exists()
