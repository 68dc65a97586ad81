"""Evaluation and prediction batches: length order, bounded rows and padded tokens, predictions in input order."""

from __future__ import annotations

import random

import pytest
import torch

from multitune.backbones import load_backbone
from multitune.config.parse import from_dict
from multitune.data.batches import feature_length, length_batches
from multitune.evaluation import evaluate_task
from multitune.evaluation.evaluator import eval_batches
from multitune.model import MultiTaskModel
from multitune.tasks import TASKS


@pytest.mark.parametrize("seed", range(5))
def test_every_input_once_within_both_bounds(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([3, 5, 8, 20, 64, 128, 300]) for _ in range(rng.randint(1, 200))]
    batches = length_batches(lengths, max_rows=16, max_tokens=512)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    for b in batches:
        assert len(b) <= 16
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= 512 or len(b) == 1  # a 300-token input over 512/2 may stand alone


def test_no_token_bound_cuts_by_rows_only():
    assert length_batches([5, 1, 3, 2, 4], max_rows=2, max_tokens=None) == [[1, 3], [2, 4], [0]]
    assert length_batches([100, 100, 100], max_rows=8, max_tokens=150) == [[0], [1], [2]]
    # short inputs fill the row bound, long ones the token bound
    assert [len(b) for b in length_batches([4] * 10 + [64] * 6, max_rows=4, max_tokens=128)] == [4, 4, 2, 2, 2, 2]
    assert length_batches([], max_rows=4) == []
    with pytest.raises(ValueError, match="max_rows"):
        length_batches([1], max_rows=0)


def test_a_bi_encoder_pair_counts_both_sides():
    assert feature_length({"input_ids": [1, 2, 3], "pair_input_ids": [4, 5]}) == 5
    assert feature_length({"input_ids": [1, 2, 3]}) == 3


@pytest.fixture(scope="module")
def model(tiny_backbone) -> MultiTaskModel:
    backbone, tok = load_backbone(tiny_backbone)
    impl = TASKS.get("classification")
    task = impl("topic", from_dict(impl.config_class, {"type": "classification", "labels": ["a", "b", "c"]}))
    task.setup([])
    torch.manual_seed(0)
    m = MultiTaskModel(backbone, {"topic": task}, tok, max_length=64)
    with torch.no_grad():
        m.heads["topic"].classifier.weight.normal_(0, 3.0)
    return m.eval()


def _examples(n: int) -> list[dict]:
    rng = random.Random(1)
    words = "the cat sat on a mat while every dog in town barked at the moon".split()
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))), "label": rng.choice("abc")}
            for _ in range(n)]


def test_token_bound_changes_batches_not_predictions(model):
    task = model.tasks["topic"]
    examples = _examples(60)
    feats = task.encode(examples, model.tokenizer, 64)
    tight = list(eval_batches(task, feats, 32, 0, max_tokens=200))
    loose = list(eval_batches(task, feats, 32, 0, max_tokens=None))
    assert len(tight) > len(loose)
    assert all(b["input_ids"].numel() <= 200 or len(i) == 1 for i, b in tight)
    m_tight, p_tight = evaluate_task(model, task, feats, examples, 32, 0, max_tokens=200)
    m_loose, p_loose = evaluate_task(model, task, feats, examples, 32, 0, max_tokens=None)
    assert [p["label"] for p in p_tight] == [p["label"] for p in p_loose]
    for a, b in zip(p_tight, p_loose):  # in input order whatever the batches
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert m_tight["accuracy"] == m_loose["accuracy"]
    one_by_one = [model.predict("topic", [ex["text"]])[0]["label"] for ex in examples[:10]]
    assert [p["label"] for p in model.predict("topic", [ex["text"] for ex in examples[:10]])] == one_by_one
