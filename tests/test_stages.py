"""Sequential training: stages, the forgetting matrix, replay, resume and stage config errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from multitune.config import parse_config
from multitune.errors import ConfigError
from tests.conftest import toy_config


def staged(toy_data, backbone, out, replay=0.0):
    raw = toy_config(toy_data, backbone, out, max_steps=6, eval_every=3)
    raw["tasks"] = {k: raw["tasks"][k] for k in ("ner", "sentiment")}
    raw["stages"] = [{"name": "ner", "tasks": ["ner"], "training": {"learning_rate": 2e-3}},
                     {"name": "sentiment", "tasks": ["sentiment"], "replay": replay,
                      "training": {"max_steps": 8, "eval_every": 4}}]
    return parse_config(raw)


def test_two_stages_write_the_forgetting_matrix_and_replay_trains_earlier_heads(tiny_backbone, toy_data, tmp_path):
    from multitune.model import load
    from multitune.training import train

    plain = train(staged(toy_data, tiny_backbone, tmp_path / "plain"), progress=False)
    run = tmp_path / "plain"
    f = json.loads((run / "forgetting.json").read_text())
    assert f["stages"] == ["ner", "sentiment"]
    assert set(f["matrix"]["ner"]) == {"ner", "sentiment"} and set(f["matrix"]["sentiment"]) == {"sentiment"}
    assert f["metric"] == {"ner": "f1", "sentiment": "accuracy"}
    assert f["forgetting"]["ner"] == pytest.approx(f["matrix"]["ner"]["ner"] - f["matrix"]["ner"]["sentiment"])
    assert (run / "forgetting.png").stat().st_size > 0 and "| ner (f1) |" in (run / "forgetting.md").read_text()
    assert plain["forgetting"] == f and [s["stage"] for s in plain["stages"]] == ["ner", "sentiment"]
    stage1, stage2 = run / "stages" / "01-ner", run / "stages" / "02-sentiment"
    # stage 2 starts from stage 1's model; without replay the ner head gets no gradient, so it is unchanged
    h1, h2 = load_file(str(stage1 / "model" / "heads.safetensors")), load_file(str(stage2 / "model" / "heads.safetensors"))
    assert all(torch.equal(h1[k], h2[k]) for k in h1 if k.startswith("ner."))
    assert not all(torch.equal(h1[k], h2[k]) for k in h1 if k.startswith("sentiment."))
    evals = [json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert set(evals[-1]["metrics"]) == {"ner", "sentiment"}  # every task seen so far is evaluated
    assert evals[-1]["sampling"] == {"sentiment": 1.0}
    stage1_evals = [json.loads(x) for x in (stage1 / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert set(stage1_evals[-1]["metrics"]) == {"ner"}  # not yet seen: not evaluated
    model = load(run)  # the run's model is the last stage's
    assert set(model.tasks) == {"ner", "sentiment"}

    train(staged(toy_data, tiny_backbone, tmp_path / "replay", replay=0.5), progress=False)
    stage2 = tmp_path / "replay" / "stages" / "02-sentiment"
    evals = [json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["sampling"] == {"sentiment": 0.5, "ner": 0.5}
    h1 = load_file(str(tmp_path / "replay" / "stages" / "01-ner" / "model" / "heads.safetensors"))
    h2 = load_file(str(stage2 / "model" / "heads.safetensors"))
    assert not all(torch.equal(h1[k], h2[k]) for k in h1 if k.startswith("ner."))  # replayed batches train it

    again = train(staged(toy_data, tiny_backbone, tmp_path / "plain"), resume=True, progress=False)
    assert again["forgetting"] == f  # finished stages are skipped, the matrix is rebuilt from their results


@pytest.mark.parametrize(("stages", "message"), [
    ([{"tasks": ["nope"]}], r"stages\[0\].tasks: no task 'nope'"),
    ([{"tasks": ["a"]}], r"stages: task 'b' is in no stage"),
    ([{"tasks": ["a"], "replay": 0.2}, {"tasks": ["b"]}], r"stages\[0\].replay: the first stage"),
    ([{"tasks": ["a"]}, {"tasks": ["b"], "training": {"max_steps": 0}}], r"stages\[1\].training.max_steps"),
    ([{"tasks": ["a"], "name": "x"}, {"tasks": ["b"], "name": "x"}], r"stages\[1\].name: stage name 'x'"),
])
def test_stage_config_errors(stages, message):
    raw = {"tasks": {t: {"type": "classification", "data": {"train": {"path": "x"}}} for t in ("a", "b")},
           "stages": stages}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, check_files=False)
