"""Class imbalance: class weights, oversampling, threshold tuning, per-class metrics and confusion matrices."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from multitune.config import parse_config
from multitune.errors import ConfigError
from multitune.evaluation.confusion import plot_confusion_matrix
from multitune.tasks.base import TaskOutput
from multitune.training.batching import TaskBatcher
from tests.conftest import toy_config
from tests.test_tasks import make

SKEWED = [{"text": f"t{i}", "label": "neg"} for i in range(9)] + [{"text": "u", "label": "pos"}]


def test_balanced_class_weights_are_inverse_frequency_and_weight_the_loss(tokenizer):
    task = make("classification", tokenizer, class_weights="balanced")
    task.setup(SKEWED)
    assert task.weights == pytest.approx([10 / (2 * 9), 10 / (2 * 1)])
    plain = make("classification", tokenizer)
    plain.setup(SKEWED)
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1])
    weighted = F.cross_entropy(logits, labels, weight=torch.tensor(task.weights))
    assert weighted > F.cross_entropy(logits, labels)  # the missed minority example counts more
    assert task.state()["class_weights"] == task.weights
    explicit = make("classification", tokenizer, class_weights=[1.0, 3.0])
    explicit.setup(SKEWED)
    assert explicit.weights == [1.0, 3.0]


def test_class_weights_errors_name_the_field(tokenizer):
    with pytest.raises(ConfigError, match=r"tasks.t.class_weights: expected 2 weights, one per label in this "
                                          r"order: neg, pos; got 3"):
        make("classification", tokenizer, class_weights=[1, 2, 3]).setup(SKEWED)
    with pytest.raises(ConfigError, match=r"tasks.t.class_weights: expected 'balanced'"):
        make("classification", tokenizer, class_weights="inverse").setup(SKEWED)
    with pytest.raises(ConfigError, match=r"tasks.t.oversample: only for single-label"):
        make("classification", tokenizer, oversample=True, multi_label=True)
    with pytest.raises(ConfigError, match=r"tasks.t.tune_threshold: needs a binary or multi-label task"):
        make("classification", tokenizer, tune_threshold=True).setup(SKEWED + [{"text": "x", "label": "mid"}])


def test_token_class_weights_count_word_tags(tokenizer):
    task = make("token_classification", tokenizer, class_weights="balanced")
    exs = [{"tokens": ["Anna", "went", "home"], "tags": ["B-PER", "O", "O"]},
           {"tokens": ["Bo", "Li", "ran"], "tags": ["B-PER", "I-PER", "O"]}]
    task.setup(exs)
    assert task.labels == ["O", "B-PER", "I-PER"]
    assert task.weights == pytest.approx([6 / (3 * 3), 6 / (3 * 2), 6 / (3 * 1)])
    batch = task.collate(task.encode(exs, tokenizer, 16), tokenizer.pad_token_id)
    logits = torch.zeros(*batch["labels"].shape, 3)
    out = task.forward(type("M", (), {"encode": lambda self, *a: torch.zeros(*batch["labels"].shape, 4)})(),
                       lambda h: logits, batch)
    assert torch.isfinite(out.loss)


def test_oversampling_balances_each_epoch_deterministically_and_resumes(tokenizer):
    task = make("classification", tokenizer, oversample=True)
    task.setup(SKEWED)
    feats = task.encode(SKEWED, tokenizer, 16)
    b = TaskBatcher(task, feats, 4, tokenizer.pad_token_id, seed=3)
    epoch0 = Counter(int(feats[i]["labels"]) for i in b._order)
    assert epoch0 == {0: 9, 1: 9}  # the single positive is drawn up to the majority count
    again = TaskBatcher(task, feats, 4, tokenizer.pad_token_id, seed=3)
    assert np.array_equal(b._order, again._order)
    assert not np.array_equal(b._permutation(0), b._permutation(1))
    for _ in range(6):  # into the second epoch
        b.next_batch()
    state = b.state_dict()
    resumed = TaskBatcher(task, feats, 4, tokenizer.pad_token_id, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(b.next_batch()["labels"], resumed.next_batch()["labels"])
    plain = make("classification", tokenizer)
    plain.setup(SKEWED)
    pb = TaskBatcher(plain, plain.encode(SKEWED, tokenizer, 16), 4, 0, seed=3)
    assert np.array_equal(pb._order, np.random.default_rng(3).permutation(10))  # unchanged without oversample


def _preds(task, probs_pos):
    return [{"label": task.labels[int(p >= 0.5)], "scores": {"neg": 1 - p, "pos": p}} for p in probs_pos]


def test_threshold_tuning_improves_macro_f1_and_is_saved(tokenizer):
    task = make("classification", tokenizer, tune_threshold=True)
    task.setup(SKEWED)
    # the model is under-confident on positives: they score 0.3-0.4, negatives 0.05-0.2
    probs = [0.05, 0.1, 0.15, 0.2, 0.1, 0.3, 0.35, 0.4]
    gold = [{"label": lab} for lab in ["neg"] * 5 + ["pos"] * 3]
    before = task.compute_metrics(_preds(task, probs), gold)["macro_f1"]
    change = task.calibrate(_preds(task, probs), gold)
    assert change == {"thresholds": {"pos": 0.3}}
    logits = torch.log(torch.tensor([[1 - p, p] for p in probs]))
    decoded = task.decode(TaskOutput(None, {"logits": logits}), {}, gold)
    after = task.compute_metrics(decoded, gold)
    assert before < after["macro_f1"] == 1.0
    reloaded = make("classification", tokenizer)
    reloaded.load_state(json.loads(json.dumps(task.state())))
    assert reloaded.decode(TaskOutput(None, {"logits": logits}), {}, gold) == decoded
    assert {"precision/pos", "recall/pos", "f1/neg"} <= set(after) and after["recall/pos"] == 1.0
    untuned = make("classification", tokenizer)
    untuned.setup(SKEWED)
    assert untuned.calibrate(_preds(untuned, probs), gold) is None


def test_multi_label_thresholds_per_label(tokenizer):
    task = make("classification", tokenizer, multi_label=True, tune_threshold=True)
    exs = [{"label": "a"}, {"label": "a,b"}, {"label": "b"}, {"label": "a"}]
    task.setup(exs)
    scores = [{"a": 0.9, "b": 0.1}, {"a": 0.8, "b": 0.25}, {"a": 0.2, "b": 0.3}, {"a": 0.7, "b": 0.05}]
    task.calibrate([{"labels": [], "scores": s} for s in scores], exs)
    assert task.thresholds[1] == pytest.approx(0.25)  # b: lowest score that still only catches true b's
    logits = torch.logit(torch.tensor([[s["a"], s["b"]] for s in scores]))
    got = [p["labels"] for p in task.decode(TaskOutput(None, {"logits": logits}), {}, exs)]
    assert got == [["a"], ["a", "b"], ["b"], ["a"]]


def test_confusion_matrix_counts_and_plot(tokenizer, tmp_path):
    task = make("classification", tokenizer)
    task.setup(SKEWED)
    gold = [{"label": lab} for lab in ["neg", "neg", "pos", "pos", "pos"]]
    preds = [{"label": lab} for lab in ["neg", "pos", "pos", "neg", "pos"]]
    labels, counts = task.confusion(preds, gold)
    assert labels == ["neg", "pos"] and counts == [[1, 1], [1, 2]]
    plot_confusion_matrix(labels, counts, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 0 and not list(tmp_path.glob(".*tmp*"))
    assert make("regression").confusion([], []) is None


def test_trainer_tunes_thresholds_and_plots_confusions(tiny_backbone, toy_data, tmp_path):
    from multitune.model import load
    from multitune.training import train

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=4, eval_every=4)
    raw["tasks"] = {"sentiment": {**raw["tasks"]["sentiment"], "tune_threshold": True, "oversample": True,
                                  "class_weights": "balanced"}}
    results = train(parse_config(raw), progress=False)
    assert set(results["calibration"]["sentiment"]["thresholds"]) == {"positive"}
    assert (tmp_path / "run" / "confusion_sentiment.png").is_file()
    model = load(tmp_path / "run")
    assert model.tasks["sentiment"].thresholds == [results["calibration"]["sentiment"]["thresholds"]["positive"]]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "calibrate" for r in rows)
