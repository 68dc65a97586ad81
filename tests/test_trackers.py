"""``training.report_to``: TensorBoard and MLflow get exactly the records of ``metrics.jsonl``; config errors; a
missing package; a failing tracker never ends a run."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from multitune.cli import main
from multitune.config import parse_config
from multitune.errors import ConfigError
from multitune.fileio import read_jsonl
from multitune.training import trackers, train
from multitune.training.trackers import scalars
from tests.conftest import crash_after_batches, toy_config

TASKS = ("sentiment", "ner", "similarity")


def tracked_config(toy_data, backbone, out, **training) -> dict:
    raw = toy_config(toy_data, backbone, out, **{"max_steps": 8, "eval_every": 4, "log_every": 2,
                                                 "report_to": ["tensorboard", "mlflow"], **training})
    raw["tasks"] = {k: raw["tasks"][k] for k in TASKS}
    raw["sampling"] = {"strategy": "temperature", "temperature": 2.0}
    raw["loss_weighting"] = {"strategy": "uncertainty"}  # weights that change
    return raw


def expected_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """name -> [(step, value)] of every record of metrics.jsonl, plus the test metrics at the last step."""
    expected = defaultdict(list)
    for record in read_jsonl(run / "metrics.jsonl"):
        for name, value in scalars(record):
            expected[name].append((record["step"], value))
    results = json.loads((run / "results.json").read_text())
    for task, metrics in results.get("test", {}).items():
        for metric, value in metrics.items():
            expected[f"test/{task}/{metric}"].append((results["train"]["steps"], value))
    return {k: sorted(v) for k, v in expected.items()}


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    info = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    return client, client.get_run(info["run_id"])


def mlflow_scalars(client, run_id: str, names) -> dict[str, list[tuple[int, float]]]:
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(run_id, n)) for n in names}


def same(got: dict, expected: dict, rel: float) -> None:
    assert set(got) == set(expected)
    for name, points in expected.items():
        assert [s for s, _ in got[name]] == [s for s, _ in points], name
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in points], rel=rel, abs=1e-7), name


def test_tensorboard_and_mlflow_carry_the_records_of_metrics_jsonl(tiny_backbone, toy_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may land in the working directory
    train(parse_config(tracked_config(toy_data, tiny_backbone, tmp_path / "run")), progress=False)
    run = tmp_path / "run"
    expected = expected_scalars(run)
    records = read_jsonl(run / "metrics.jsonl")
    first_train = next(r for r in records if r["kind"] == "train")
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    # the names the docs promise, checked against metrics.jsonl directly
    assert expected["lr"][0] == (first_train["step"], first_train["lr"])
    for task in TASKS:
        with_task = next(r for r in records if r["kind"] == "train" and task in r["loss"])  # one task per step
        assert expected[f"loss/{task}"][0] == (with_task["step"], with_task["loss"][task])
        assert expected[f"loss_weight/{task}"][0] == (first_train["step"], first_train["loss_weights"][task])
        assert (last_eval["step"], last_eval["sampling"][task]) in expected[f"sampling/{task}"]
    assert (8, last_eval["metrics"]["sentiment"]["accuracy"]) in expected["validation/sentiment/accuracy"]
    assert "test/ner/f1" in expected

    same(tensorboard_scalars(run), expected, rel=1e-6)  # TensorBoard keeps float32

    client, mlrun = mlflow_run(run)
    assert (run / "mlflow.db").is_file() and mlrun.info.status == "FINISHED"
    same(mlflow_scalars(client, mlrun.info.run_id, expected), expected, rel=1e-12)
    assert set(mlrun.data.metrics) == set(expected)
    params = mlrun.data.params
    assert params["training.learning_rate"] == "0.001" and params["tasks.ner.type"] == "token_classification"
    assert params["training.report_to"] == '["tensorboard", "mlflow"]'
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert artifacts == {"results.json", "config.yaml"}
    assert list((tmp_path / "cwd").iterdir()) == []


def test_resumed_run_replaces_its_tracked_run_and_an_mlflow_uri_comes_from_the_environment(
        tiny_backbone, toy_data, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow puts the artifacts of a store it did not create in ./mlruns
    raw = tracked_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=12)
    with crash_after_batches(6), pytest.raises(KeyboardInterrupt):  # in step 7: after step 4's checkpoint
        train(parse_config(raw), progress=False)
    run = tmp_path / "run"
    client, first = mlflow_run(run)
    assert first.info.status == "RUNNING" and [s for s, _ in tensorboard_scalars(run)["lr"]] == [2, 4, 6]
    train(parse_config(raw), resume=True, progress=False)
    client, second = mlflow_run(run)
    assert json.loads((run / "mlflow_run.json").read_text())["tracking_uri"] == uri and not (run / "mlflow.db").exists()
    assert second.info.run_id != first.info.run_id
    assert client.get_run(first.info.run_id).info.lifecycle_stage == "deleted"
    # both trackers hold metrics.jsonl as it is after the resume: no step logged twice
    expected = expected_scalars(run)
    assert [s for s, _ in expected["lr"]] == [2, 4, 6, 8, 10, 12]
    same(tensorboard_scalars(run), expected, rel=1e-6)
    same(mlflow_scalars(client, second.info.run_id, expected), expected, rel=1e-12)


@pytest.mark.parametrize(("training", "message"), [
    ({"report_to": ["tensorbord"]}, r"training.report_to\[0\]: got 'tensorbord' \(did you mean 'tensorboard'\?\); "
                                     r"expected one of: tensorboard, mlflow"),
    ({"report_to": "tensorboard"}, r"training.report_to: expected a list, got 'tensorboard'"),
    ({"mlflow_tracking_uri": "sqlite:///x.db"}, r"training.mlflow_tracking_uri: only used with report_to: \[mlflow\]"),
])
def test_report_to_config_errors(training, message):
    raw = {"tasks": {"a": {"type": "classification", "data": {"train": {"path": "x"}}}}, "training": training}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, check_files=False)


def test_a_missing_tracker_package_is_one_line_before_the_run_writes(tiny_backbone, toy_data, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setitem(trackers.NEEDS, "mlflow", ["mlflow_is_not_installed"])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tracked_config(toy_data, tiny_backbone, tmp_path / "run")))
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("multitune: error: training.report_to: mlflow needs the package mlflow_is_not_installed: "
                   "pip install 'multitune[track]'")
    assert not (tmp_path / "run").exists()


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, capsys):
    class Broken(trackers._Sink):
        name = "broken"
        calls = 0

        def start(self):
            Broken.calls += 1
            raise OSError("disk full")

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": {"a": 1.0}}) + "\n")
    sink = Broken(tmp_path)
    for step in (1, 2):
        sink({"kind": "train", "step": step, "loss": {"a": 1.0}})
    sink.close()
    assert Broken.calls == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken stopped logging (OSError: disk full)" in err


def test_scalar_names():
    assert scalars({"kind": "train", "step": 2, "lr": 0.1, "loss": {"a": 1.0}, "loss_weights": {"a": 0.5},
                    "grad_stats": {"conflicts": 3, "cosine": {"a|b": -0.5}}}) == [
        ("lr", 0.1), ("loss/a", 1.0), ("loss_weight/a", 0.5), ("grad_stats/conflicts", 3.0),
        ("grad_stats/cosine/a_b", -0.5)]
    assert scalars({"kind": "eval", "step": 4, "split": "validation", "metrics": {"a": {"f1": 0.5, "f1/B-PER": 0.25}},
                    "selection": {"metric": "a/f1", "value": 0.5}, "sampling": {"a": 1.0}, "epochs": {"a": 0.5}}) == [
        ("validation/a/f1", 0.5), ("validation/a/f1/B-PER", 0.25), ("selection/a/f1", 0.5), ("sampling/a", 1.0),
        ("epochs/a", 0.5)]
    assert scalars({"kind": "sampling", "step": 4, "shares": {"a": 0.7, "b": 0.3}, "reasons": {"a": "lags"}}) == [
        ("sampling/a", 0.7), ("sampling/b", 0.3)]
    assert scalars({"kind": "affinity", "step": 4, "cosine": {"a": {"a": 1.0, "b": None}}, "seconds": 0.5}) == [
        ("affinity/cosine/a/a", 1.0), ("affinity/seconds", 0.5)]
    assert scalars({"kind": "bad_step", "step": 3, "task": "a", "reason": "non-finite loss"}) == []
