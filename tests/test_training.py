"""The training loop: determinism, exact resume, early stopping, outputs, run-directory safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitune.config import parse_config
from multitune.errors import MultituneError
from multitune.training import train
from tests.conftest import crash_after_batches, toy_config


def weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / which / "model.safetensors"))


def run_cfg(toy_data, tiny_backbone, out, **training):
    raw = toy_config(toy_data, tiny_backbone, out, **training)
    raw["sampling"] = {"strategy": "temperature", "temperature": 2.0}
    raw["loss_weighting"] = {"strategy": "uncertainty"}
    return parse_config(raw)


def test_same_seed_same_weights_and_outputs(tiny_backbone, toy_data, tmp_path):
    a = train(run_cfg(toy_data, tiny_backbone, tmp_path / "a"), progress=False)
    b = train(run_cfg(toy_data, tiny_backbone, tmp_path / "b"), progress=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["validation"] == b["validation"]
    # the run directory holds what the docs promise
    run = tmp_path / "a"
    for name in ("config.yaml", "metrics.jsonl", "results.json", "parameters.json", "learning_curves.png",
                 "model/multitune.json", "model/heads.safetensors", "model/backbone/model.safetensors"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8]
    assert set(evals[0]["metrics"]) == {"sentiment", "ner", "similarity", "mlm"}
    assert set(evals[0]["loss_weights"]) == set(evals[0]["sampling"]) == set(evals[0]["metrics"])
    assert any(w != 1.0 for w in evals[-1]["loss_weights"].values())  # uncertainty weights were learned
    results = json.loads((run / "results.json").read_text())
    assert set(results) >= {"validation", "test", "train"} and results["train"]["steps"] == 8


def test_different_seed_different_weights(tiny_backbone, toy_data, tmp_path):
    train(run_cfg(toy_data, tiny_backbone, tmp_path / "a"), progress=False)
    cfg = run_cfg(toy_data, tiny_backbone, tmp_path / "b")
    cfg.seed = 2
    train(cfg, progress=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_run_resumes_bitwise(tiny_backbone, toy_data, tmp_path):
    full = run_cfg(toy_data, tiny_backbone, tmp_path / "full", max_steps=12, eval_every=4)
    train(full, progress=False)

    cut = run_cfg(toy_data, tiny_backbone, tmp_path / "cut", max_steps=12, eval_every=4)
    with crash_after_batches(6), pytest.raises(KeyboardInterrupt):
        train(cut, progress=False)
    assert json.loads((tmp_path / "cut/checkpoints/last/trainer_state.json").read_text())["step"] == 4
    train(run_cfg(toy_data, tiny_backbone, tmp_path / "cut", max_steps=12, eval_every=4), resume=True,
          progress=False)
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    full_lines = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    cut_lines = (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]  # noqa: E731
    assert strip(full_lines) == strip(cut_lines)


def test_resume_refuses_a_different_config(tiny_backbone, toy_data, tmp_path):
    train(run_cfg(toy_data, tiny_backbone, tmp_path / "r"), progress=False)
    other = run_cfg(toy_data, tiny_backbone, tmp_path / "r", learning_rate=5e-4)
    with pytest.raises(MultituneError, match=r"--resume with a different config \(differs in: training.learning_rate\)"):
        train(other, resume=True, progress=False)


def test_non_empty_output_dir_is_refused_and_kept(tiny_backbone, toy_data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(MultituneError, match=r"is not empty and was not written by multitune"):
        train(run_cfg(toy_data, tiny_backbone, out), progress=False)
    with pytest.raises(MultituneError, match=r"--overwrite only replaces multitune's own directories"):
        train(run_cfg(toy_data, tiny_backbone, out), overwrite=True, progress=False)
    with pytest.raises(MultituneError, match=r"is not a multitune run directory .* nothing to resume"):
        train(run_cfg(toy_data, tiny_backbone, out), resume=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_early_stopping_restores_best(tiny_backbone, toy_data, tmp_path):
    cfg = run_cfg(toy_data, tiny_backbone, tmp_path / "es", max_steps=40, eval_every=2, learning_rate=0.5,
                  early_stopping={"metric": "sentiment/accuracy", "patience": 1, "min_delta": 0.5})
    res = train(cfg, progress=False)
    assert res["train"]["stopped_early"] and res["train"]["steps"] == 4
    assert res["train"]["best_step"] == 2
    best = json.loads((tmp_path / "es/checkpoints/best/trainer_state.json").read_text())
    assert best["step"] == 2


def test_bf16_and_accumulation_run(tiny_backbone, toy_data, tmp_path):
    cfg = run_cfg(toy_data, tiny_backbone, tmp_path / "bf", precision="bf16", gradient_accumulation_steps=2,
                  scheduler="cosine", warmup_ratio=0.25)
    res = train(cfg, progress=False)
    assert res["train"]["precision"] == "bf16" and res["train"]["steps"] == 8
    # 2 micro-batches per step; end-of-epoch batches of the tiny sets are smaller than 8
    assert 8 * 2 * 4 < res["train"]["examples"] <= 8 * 2 * 8
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "bf").values())


def test_training_learns_the_toy_sentiment(tiny_backbone, toy_data, tmp_path):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "learn", max_steps=60, eval_every=20,
                     learning_rate=3e-3)
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    raw["tasks"]["sentiment"]["data"]["validation"] = raw["tasks"]["sentiment"]["data"]["train"]
    raw["freeze"] = "none"  # the random-init toy backbone's word embeddings mean nothing until they train
    res = train(parse_config(raw), progress=False)
    assert res["validation"]["sentiment"]["accuracy"] >= 0.9


def _count_evaluations(monkeypatch) -> list[tuple[int, str]]:
    """(step, split) of every evaluation a run makes."""
    import multitune.training.run as run_module

    calls: list[tuple[int, str]] = []
    original = run_module.Run.evaluate

    def counting(self, split, predictions=None):
        calls.append((self.state.step, split))
        return original(self, split, predictions)

    monkeypatch.setattr(run_module.Run, "evaluate", counting)
    return calls


def test_a_last_step_that_is_the_best_is_not_evaluated_again(tiny_backbone, toy_data, tmp_path, monkeypatch):
    """The one evaluation of a run is at its last step, so it is the best one: the final validation metrics are
    that evaluation's, not a second pass over the same model; a run whose best step is earlier restores it and
    evaluates again."""
    calls = _count_evaluations(monkeypatch)
    res = train(run_cfg(toy_data, tiny_backbone, tmp_path / "once", max_steps=4, eval_every=4), progress=False)
    assert res["train"]["best_step"] == 4
    assert [c for c in calls if c[1] == "validation"] == [(4, "validation")]
    records = [json.loads(line) for line in (tmp_path / "once/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert evals[-1]["step"] == 4
    for task, metrics in res["validation"].items():
        assert {k: evals[-1]["metrics"][task][k] for k in metrics} == pytest.approx(metrics), task
    calls.clear()
    cfg = run_cfg(toy_data, tiny_backbone, tmp_path / "es", max_steps=40, eval_every=2, learning_rate=0.5,
                  early_stopping={"metric": "sentiment/accuracy", "patience": 1, "min_delta": 0.5})
    res = train(cfg, progress=False)
    assert res["train"]["best_step"] == 2 and res["train"]["steps"] == 4
    assert [c for c in calls if c[1] == "validation"] == [(2, "validation"), (4, "validation"), (4, "validation")]
