"""Hyperparameter search on tiny models: grid and TPE run, the best config reproduces its value, an interrupted
study resumes to the asked number of trials, pruning stops bad trials, and a bad space is one line."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from multitune.cli import main  # noqa: E402
from multitune.config import load_config  # noqa: E402
from multitune.errors import MultituneError  # noqa: E402
from multitune.evaluation.evaluator import selection_value  # noqa: E402
from multitune.search import run_search  # noqa: E402
from multitune.search.space import parse_parameter  # noqa: E402
from multitune.training import train  # noqa: E402
from tests.conftest import REPO, toy_config  # noqa: E402


@pytest.fixture()
def config_path(tiny_backbone, toy_data, tmp_path):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=6, eval_every=2)
    raw["tasks"] = {k: raw["tasks"][k] for k in ("sentiment", "similarity")}
    raw["sampling"] = {"strategy": "temperature", "temperature": 2.0}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _space(tmp_path, data, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_parameters_parse_and_grid():
    lr = parse_parameter("training.learning_rate", {"low": 1e-5, "high": 1e-3, "log": True})
    assert not lr.integer and lr.log
    with pytest.raises(MultituneError, match="needs a list of values or a step"):
        lr.grid()
    assert parse_parameter("training.batch_size", {"low": 8, "high": 32, "step": 8}).grid() == [8, 16, 24, 32]
    assert parse_parameter("training.warmup_ratio", {"low": 0.0, "high": 0.2, "step": 0.1}).grid() == [0.0, 0.1, 0.2]
    assert parse_parameter("sampling.temperature", [1, 2, 5, 2]).grid() == [1, 2, 5]
    assert parse_parameter("training.max_steps", {"low": 4, "high": 8}).grid() == [4, 5, 6, 7, 8]


def test_grid_search_best_config_reproduces_its_value(config_path, tmp_path):
    space = _space(tmp_path, {"training.learning_rate": [1e-3, 1e-5]})
    out = tmp_path / "search"
    result = run_search(config_path, space, out, strategy="grid", pruner="none")
    assert result.finished == 2 and set(result.best_params) == {"training.learning_rate"}
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "complete"]
    assert {float(r["training.learning_rate"]) for r in rows} == {1e-3, 1e-5}
    assert "| trial | state | value |" in (out / "trials.md").read_text()
    for name in ("optimization_history.png", "param_importances.png", "study.db"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "trials" / f"{result.best_trial:03d}" / "model").is_dir()
    assert not (out / "trials" / "000" / "checkpoints").exists()  # removed once a trial is done
    best = out / "best.yaml"
    assert best.read_text().startswith(f"# multitune train {best}")
    config = load_config(best)
    assert config.training.learning_rate == result.best_params["training.learning_rate"]
    assert config.output_dir == str(out / "best")
    from multitune.training.trainer import build_tasks

    results = train(config, progress=False)  # what `multitune train OUTPUT/best.yaml` does
    assert selection_value("mean", results["validation"], build_tasks(config)) == pytest.approx(result.best_value, abs=1e-9)


def test_tpe_search_resumes_to_the_asked_number_of_trials(config_path, tmp_path, capsys):
    space = _space(tmp_path, {"training.learning_rate": {"low": 1e-5, "high": 1e-2, "log": True},
                              "sampling.temperature": [1, 2, 5]})
    out = tmp_path / "tpe"
    argv = ["search", str(config_path), "--space", str(space), "--strategy", "tpe", "--output-dir", str(out),
            "--pruner", "none", "--metric", "sentiment/accuracy"]
    assert main(argv + ["--trials", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["finished_trials"] == 2
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert main(argv + ["--trials", "3"]) == 0  # the same study, one more trial
    second = json.loads(capsys.readouterr().out)
    again = list(csv.DictReader((out / "trials.csv").open()))
    assert second["finished_trials"] == 3 and [r["trial"] for r in again] == ["0", "1", "2"]
    assert again[:2] == rows  # the first trials were not run again
    assert main(argv + ["--trials", "3"]) == 0 and len(list((out / "trials").iterdir())) == 3  # nothing to do
    capsys.readouterr()
    err = _one_line_error(capsys, argv[:-2] + ["--metric", "mean", "--trials", "4"])
    assert "was started with another metric" in err


class PruneSmallLearningRates(optuna.pruners.BasePruner):
    """Prunes, at its first evaluation, every trial whose learning rate is below 1e-4 (deterministic)."""

    def prune(self, study, trial):
        return trial.params["training.learning_rate"] < 1e-4


def test_pruned_trials_stop_at_their_first_evaluation(config_path, tmp_path):
    space = _space(tmp_path, {"training.learning_rate": [1e-3, 1e-6, 1e-7]})
    out = tmp_path / "pruned"
    result = run_search(config_path, space, out, strategy="grid", pruner=PruneSmallLearningRates())
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{out / 'study.db'}")
    states = {t.params["training.learning_rate"]: t for t in study.trials}
    assert states[1e-3].state.name == "COMPLETE" and result.best_params == {"training.learning_rate": 1e-3}
    for lr in (1e-6, 1e-7):
        assert states[lr].state.name == "PRUNED"
        assert list(states[lr].intermediate_values) == [2]  # reported at step 2, stopped there
        assert not (out / "trials" / f"{states[lr].number:03d}" / "model").exists()
    assert result.finished == 3


class PruneSmallLearningRatesInTheSecondStage(optuna.pruners.BasePruner):
    def prune(self, study, trial):  # a small learning rate is pruned at its first report after step 6
        return trial.params["training.learning_rate"] < 1e-4 and max(trial.intermediate_values) > 6


def test_staged_runs_are_searched_and_pruned_in_a_later_stage(config_path, tmp_path):
    raw = yaml.safe_load(config_path.read_text())
    raw["stages"] = [{"name": "first", "tasks": ["sentiment"]}, {"name": "second", "tasks": ["similarity"]}]
    staged = tmp_path / "staged.yaml"
    staged.write_text(yaml.safe_dump(raw), encoding="utf-8")
    space = _space(tmp_path, {"training.learning_rate": [1e-3, 1e-6]})
    out = tmp_path / "staged-search"
    result = run_search(staged, space, out, strategy="grid", pruner=PruneSmallLearningRatesInTheSecondStage())
    study = optuna.load_study(study_name="staged-search", storage=f"sqlite:///{out / 'study.db'}")
    trials = {t.params["training.learning_rate"]: t for t in study.trials}
    # 6 steps per stage, eval_every 2: steps counted over the stages
    assert list(trials[1e-3].intermediate_values) == [2, 4, 6, 8, 10, 12]
    assert trials[1e-3].state.name == "COMPLETE" and result.best_params == {"training.learning_rate": 1e-3}
    assert trials[1e-6].state.name == "PRUNED" and list(trials[1e-6].intermediate_values) == [2, 4, 6, 8]
    assert not list((out / "trials").glob("*/stages/*/checkpoints"))  # trials keep no checkpoints


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("space, expected", [
    ({"training.learnin_rate": [1e-3]}, "training.learnin_rate: unknown key (did you mean 'learning_rate'?)"),
    ({"training.learning_rate": {"low": 1e-3}}, "training.learning_rate.high: required field is missing"),
    ({"training.learning_rate": {"low": -1.0, "high": 1.0}}, "training.learning_rate: must be greater than 0"),
    ({"training.batch_size": {"low": 4.0, "high": 16.0}}, "training.batch_size: expected an integer"),
    ({"sampling.temprature": [1, 2]}, "sampling.temprature: unknown key (did you mean 'temperature'?)"),
    ({"training.learning_rate": {"low": 1e-5, "high": 1e-3, "log": True, "foo": 1}},
     "training.learning_rate.foo: unknown key"),
])
def test_bad_space_is_one_line(config_path, tmp_path, capsys, space, expected):
    path = _space(tmp_path, space)
    err = _one_line_error(capsys, ["search", str(config_path), "--space", str(path), "--output-dir",
                                   str(tmp_path / "s")])
    assert f"{path}: {expected}" in err, err
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_space_may_sample_max_steps_below_eval_every(config_path, tmp_path):
    """A sampled max_steps under the config's eval_every is no error: the trial's eval_every is lowered to it."""
    from multitune.search import load_space

    base = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    space = load_space(_space(tmp_path, {"training.max_steps": [1, 6], "training.eval_every": [100]}), base)
    assert {p.path for p in space.parameters} == {"training.max_steps", "training.eval_every"}


def test_grid_needs_values_and_missing_space_is_one_line(config_path, tmp_path, capsys):
    path = _space(tmp_path, {"training.learning_rate": {"low": 1e-5, "high": 1e-3}})
    err = _one_line_error(capsys, ["search", str(config_path), "--space", str(path), "--strategy", "grid"])
    assert "--strategy grid: training.learning_rate needs a list of values or a step" in err
    err = _one_line_error(capsys, ["search", str(config_path), "--space", str(tmp_path / "nope.yaml")])
    assert "nope.yaml: config file not found" in err


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "search").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_fit_the_quickstart_config(path, tmp_path):
    from multitune.quickstart.run import quickstart_config
    from multitune.search import load_space

    files = {t: {s: tmp_path / f"{t}-{s}" for s in ("train", "validation")}
             for t in ("sentiment", "ner", "similarity")}
    space = load_space(path, quickstart_config(files, tmp_path / "run", 300))
    assert space.parameters and path.read_text().startswith("# multitune search ")
