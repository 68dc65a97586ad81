"""Integration: the real packaged MiniLM on real data (../shared/data) and on the quickstart data."""

from __future__ import annotations

import json

import pytest

from multitune.config import load_config
from multitune.training import train
from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repository")
def test_seed_mixture_trains_on_real_data(tmp_path):
    cfg = load_config(REPO / "examples/configs/seed-mixture.yaml", [
        f"output_dir={tmp_path / 'seed'}", "training.max_steps=36", "training.eval_every=18",
        "training.batch_size=16", "training.max_length=64",
        "tasks.sentiment.data.train.max_examples=1200", "tasks.sentiment.data.validation.max_examples=200",
        "tasks.ner.data.train.max_examples=600", "tasks.ner.data.validation.max_examples=200",
        "tasks.similarity.data.train.max_examples=800", "tasks.similarity.data.validation.max_examples=200",
    ], base_dir=REPO)
    results = train(cfg, progress=False)
    run = tmp_path / "seed"
    saved = json.loads((run / "results.json").read_text())
    assert saved["validation"] == results["validation"]
    assert set(saved["validation"]) == {"sentiment", "ner", "similarity"}
    assert saved["train"]["steps"] == 36 and saved["train"]["examples_per_s"] > 0
    assert saved["data"]["sentiment"]["train"]["sampled"] == 1200
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [18, 36]
    v = saved["validation"]
    assert 0.0 <= v["sentiment"]["accuracy"] <= 1.0 and 0.0 <= v["ner"]["f1"] <= 1.0
    assert -1.0 <= v["similarity"]["pearson"] <= 1.0 and v["similarity"]["mse"] >= 0.0
    # learning itself is shown on real data by bench/seed_mixture.py and here by test_quickstart_learns


def test_quickstart_learns(tmp_path):
    from multitune.quickstart.run import run_quickstart

    results = run_quickstart(tmp_path / "qs", steps=60, progress=False)
    v = results["validation"]
    assert v["sentiment"]["accuracy"] > 0.75  # chance is 0.5
    assert v["ner"]["f1"] > 0.3
    assert v["similarity"]["pearson"] > 0.5
