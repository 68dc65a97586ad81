"""``multitune merge``: the per-task LoRA adapters of a tiny run merged with each method. The linear merge is
the weighted sum of the task updates; DARE that drops nothing equals it; the merged directory loads, predicts
and evaluates; merge.json scores every task with its own and the merged adapter; one-line errors; ``multitune
compare`` shows a merge as a row."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import multitune
from multitune.adapters.merge import merge_lora
from multitune.analysis.merge import merge_run
from multitune.cli import main
from multitune.config import parse_config
from multitune.errors import MultituneError
from multitune.evaluation.run import evaluate_run
from multitune.fileio import finite_json
from multitune.model import MultiTaskModel
from multitune.training import train
from tests.conftest import toy_config, write_toy_data

TASKS = ("sentiment", "ner", "similarity")


@pytest.fixture(scope="module")
def lora_run(tiny_backbone, tmp_path_factory) -> Path:
    """Three tasks, one rank-4 LoRA adapter each, on the tiny BERT."""
    base = tmp_path_factory.mktemp("merge")
    raw = toy_config(write_toy_data(base), tiny_backbone, base / "run", max_steps=6, eval_every=3, batch_size=8,
                     learning_rate=1e-2)
    raw["tasks"] = {t: raw["tasks"][t] for t in TASKS}
    raw["adapters"] = {"method": "lora", "arrangement": "per_task", "r": 4}
    train(parse_config(raw), progress=False)
    return base / "run"


def _delta(ad, scaling: float = 1.0) -> torch.Tensor:
    return scaling * ad.lora_B.detach() @ ad.lora_A.detach()


def test_linear_merge_is_the_weighted_sum_of_the_task_updates(lora_run, tmp_path, capsys):
    out = tmp_path / "m"
    report = merge_run(lora_run, ["ner", "sentiment"], "linear", out, weights=[1.3, 0.7], source="final")
    assert report["tasks"] == ["sentiment", "ner"] and report["weights"] == {"sentiment": 0.7, "ner": 1.3}
    assert report["rank"] == {"per_task": 4, "merged": 8} and report["peft_combination_type"] == "cat"
    run, merged = MultiTaskModel.load(lora_run), MultiTaskModel.load(out)
    assert list(merged.tasks) == ["sentiment", "ner"] and merged.adapters.config.arrangement == "shared"
    assert merged.adapters.method.scaling == 1.0 and merged.adapters.site_paths == run.adapters.site_paths
    s = run.adapters.method.scaling
    for path in run.adapters.site_paths:
        expected = sum(w * _delta(run.adapters.modules_by_site(t)[path], s) for t, w in (("sentiment", 0.7),
                                                                                       ("ner", 1.3)))
        torch.testing.assert_close(_delta(merged.adapters.modules_by_site("ner")[path]), expected,
                                   atol=1e-6, rtol=1e-5)
    for task in ("sentiment", "ner"):  # every task keeps its own head
        for key, value in run.heads[task].state_dict().items():
            assert torch.equal(merged.heads[task].state_dict()[key], value)

    # merge.json: the own adapter scores as `multitune evaluate RUN`, the merged one as `multitune evaluate DIR`
    on_disk = json.loads((out / "merge.json").read_text())
    assert on_disk["results"] == finite_json(report["results"])
    own = evaluate_run(lora_run)["validation"]
    for task in ("sentiment", "ner"):
        row = on_disk["results"][task]["validation"]
        assert row["per_task"] == pytest.approx(own[task])
        assert row["delta"] == pytest.approx(row["merged"][row["metric"]] - row["per_task"][row["metric"]])
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)["validation"]
    for task in ("sentiment", "ner"):
        assert again[task] == pytest.approx(on_disk["results"][task]["validation"]["merged"])
    assert "| sentiment |" in (out / "merge.md").read_text()
    (pred,) = multitune.load(out).predict("ner", ["anna visited oslo today"])
    assert "entities" in pred
    # the merged adapter folds into the backbone like any LoRA adapter
    assert main(["export", str(out), "--task", "ner", "--merge", "--output", str(tmp_path / "e")]) == 0
    assert multitune.load(tmp_path / "e").predict("ner", ["anna visited oslo today"]) == [pred]


def test_dare_that_keeps_everything_is_the_linear_merge(lora_run):
    run = MultiTaskModel.load(lora_run)
    s = run.adapters.method.scaling
    factors = [{p: (ad.lora_A, ad.lora_B) for p, ad in run.adapters.modules_by_site(t).items()}
               for t in ("sentiment", "similarity")]
    linear, rank = merge_lora(factors, [s, s], [0.6, 1.0], "linear")
    dare, same_rank = merge_lora(factors, [s, s], [0.6, 1.0], "dare", density=1.0)
    assert rank == same_rank == 8
    for path, (a, b) in linear.items():
        torch.testing.assert_close(dare[path][1] @ dare[path][0], b @ a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties"])
def test_every_method_writes_a_model_that_loads_and_predicts(lora_run, tmp_path, method):
    out = tmp_path / "m"
    report = merge_run(lora_run, ["similarity", "sentiment"], method, out, density=0.5, seed=3)
    assert report["tasks"] == ["sentiment", "similarity"] and report["density"] == 0.5
    assert set(report["results"]) == {"sentiment", "similarity"}
    for task, splits in report["results"].items():
        assert "validation" in splits and report["source"][task]["source"] in ("per-task-best", "final")
    model = multitune.load(out)
    assert model.adapters.config.r == 8
    deltas = [_delta(ad) for ad in model.adapters.modules_by_site("sentiment").values()]
    assert all(torch.isfinite(d).all() and d.abs().sum() > 0 for d in deltas)
    assert model.predict("sentiment", ["the film was great"])[0]["label"] in ("negative", "positive")
    assert isinstance(model.predict("similarity", [("a film", "a movie")])[0]["score"], float)
    # the tasks are not next to each other in the run (0 and 2): the config says what that means
    assert "not next to each other" in (out / "config.yaml").read_text()


def test_merge_lora_checks_its_inputs():
    a = {"x.q": (torch.randn(2, 6), torch.randn(5, 2))}
    merged, rank = merge_lora([a, a], [2.0, 2.0], [0.5, 0.5], "linear")
    assert rank == 4
    torch.testing.assert_close(merged["x.q"][1] @ merged["x.q"][0], 2.0 * a["x.q"][1] @ a["x.q"][0])
    with pytest.raises(MultituneError, match="at least two adapters"):
        merge_lora([a], [1.0], [1.0], "linear")
    with pytest.raises(MultituneError, match="other layers or has other shapes"):
        merge_lora([a, {"x.k": a["x.q"]}], [1.0, 1.0], [1.0, 1.0], "ties")
    with pytest.raises(MultituneError, match=r"density: expected a share in \(0, 1\]"):
        merge_lora([a, a], [1.0, 1.0], [1.0, 1.0], "dare", density=0.0)


def _fake_run(lora_run: Path, where: Path, adapters: dict | None) -> Path:
    """A copy of the run's config and metadata with other adapters (merge checks them before loading)."""
    (where / "model").mkdir(parents=True)
    shutil.copy(lora_run / "config.yaml", where / "config.yaml")
    meta = json.loads((lora_run / "model" / "multitune.json").read_text())
    if adapters is None:
        meta.pop("adapters")
    else:
        meta["adapters"].update(adapters)
    (where / "model" / "multitune.json").write_text(json.dumps(meta))
    return where


@pytest.mark.parametrize("args,message", [
    (["--tasks", "sentiment"], "--tasks: merge needs at least two tasks, got 1"),
    (["--tasks", "sentiment,nerr"], "--tasks: the run .* has no task 'nerr' \\(did you mean 'ner'\\?\\)"),
    (["--tasks", "sentiment,ner,sentiment"], "--tasks: task 'sentiment' is named twice"),
    (["--tasks", "sentiment,ner", "--weights", "1"], "--weights: 1 weights for 2 tasks"),
    (["--tasks", "sentiment,ner", "--method", "ties", "--density", "1.5"], "--density: expected"),
    (["--tasks", "sentiment,ner", "--weights", "1,x"], "argument --weights: expected comma-separated numbers"),
])
def test_request_errors_are_one_line(lora_run, tmp_path, capsys, args, message):
    argv = ["merge", str(lora_run), "--output", str(tmp_path / "m"), *args]
    if "--method" not in args:
        argv += ["--method", "linear"]
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from the parser
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "m").exists()


def test_runs_without_per_task_lora_are_refused(lora_run, tmp_path, capsys):
    shared = _fake_run(lora_run, tmp_path / "shared", {"arrangement": "shared"})
    plain = _fake_run(lora_run, tmp_path / "plain", None)
    for run, says in ((shared, "this run has method lora, arrangement shared"), (plain, "this run has no adapters"),
                      (tmp_path, "not a run directory")):
        capsys.readouterr()
        assert main(["merge", str(run), "--tasks", "sentiment,ner", "--method", "linear", "--output",
                     str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["merge", str(lora_run), "--tasks", "sentiment,ner", "--method", "linear", "--output",
                 str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


def test_compare_shows_a_merge_as_a_row(lora_run, tmp_path, capsys):
    merge_run(lora_run, ["sentiment", "ner"], "ties", tmp_path / "m")
    raw = yaml.safe_load((lora_run / "config.yaml").read_text())
    raw["tasks"] = {t: raw["tasks"][t] for t in ("sentiment", "ner")}
    raw["training"].update(max_steps=2, eval_every=2)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    capsys.readouterr()
    assert main(["compare", str(config), "--output", str(tmp_path / "bad"), "--merge", str(tmp_path)]) == 2
    assert "--merge: " in capsys.readouterr().err and not (tmp_path / "bad").exists()  # before any training
    assert main(["compare", str(config), "--output", str(tmp_path / "cmp"), "--no-progress", "--merge",
                 str(tmp_path / "m")]) == 0
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (row,) = report["merges"]["validation"]
    assert row["label"] == "merge of single-task adapters (ties)" and set(row["tasks"]) == {"sentiment", "ner"}
    merged = json.loads((tmp_path / "m" / "merge.json").read_text())["results"]
    for task, cell in row["tasks"].items():
        metric = report["validation"][task]["metric"]
        assert cell["value"] == merged[task]["validation"]["merged"][metric]
        assert cell["delta_vs_single"] == pytest.approx(cell["value"] - report["validation"][task]["single"])
    assert "| merge of single-task adapters (ties) |" in (tmp_path / "cmp" / "compare.md").read_text()
