"""Class imbalance: class weights, oversampling, threshold tuning, per-class metrics and confusion matrices."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.errors import ConfigError
from multitune.evaluation.confusion import plot_confusion_matrix
from multitune.tasks import TASKS
from multitune.tasks.base import TaskOutput
from multitune.tasks.classification import ClassificationConfig, best_threshold
from multitune.training.batching import TaskBatcher
from tests.conftest import toy_config
from tests.test_tasks import make

SKEWED = [{"text": f"t{i}", "label": "neg"} for i in range(9)] + [{"text": "u", "label": "pos"}]


class FakeModel:
    """Stands in for the backbone: the head below ignores the hidden states and returns fixed logits."""

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        return torch.zeros(*input_ids.shape, 4)

    def pool(self, hidden, attention_mask):
        return hidden[:, 0]


def loss_of(task, tokenizer, examples, logits):
    batch = task.collate(task.encode(examples, tokenizer, 16), tokenizer.pad_token_id)
    return task.forward(FakeModel(), lambda hidden: logits, batch).loss


def test_balanced_class_weights_are_inverse_frequency_and_weight_the_loss(tokenizer):
    task = make("classification", tokenizer, class_weights="balanced")
    task.setup(SKEWED)
    assert task.weights == pytest.approx([10 / (2 * 9), 10 / (2 * 1)])
    assert task.state()["class_weights"] == task.weights
    plain = make("classification", tokenizer)
    plain.setup(SKEWED)
    assert plain.weights is None
    batch = [SKEWED[0], SKEWED[-1]]  # one neg, one pos; the model is sure of neg for both
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    weighted, unweighted = loss_of(task, tokenizer, batch, logits), loss_of(plain, tokenizer, batch, logits)
    assert unweighted == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1])).item())
    assert weighted == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1]),
                                                     weight=torch.tensor(task.weights)).item())
    assert weighted > unweighted  # the missed minority example counts more
    explicit = make("classification", tokenizer, class_weights=[1.0, 3.0])
    explicit.setup(SKEWED)
    assert explicit.weights == [1.0, 3.0]
    restored = make("classification", tokenizer)
    restored.load_state(json.loads(json.dumps(task.state())))
    assert loss_of(restored, tokenizer, batch, logits) == pytest.approx(weighted.item())


def test_multi_label_balanced_is_pos_weight(tokenizer):
    task = make("classification", tokenizer, multi_label=True, class_weights="balanced")
    task.setup([{"text": "a", "label": "x"}, {"text": "b", "label": "x,y"}, {"text": "c", "label": "x"},
                {"text": "d", "label": "x"}])
    assert task.weights == pytest.approx([0 / 4, 3 / 1])  # negatives / positives per label


def test_class_weights_errors_name_the_field(tokenizer):
    with pytest.raises(ConfigError, match=r"tasks.t.class_weights: expected 2 weights, one per label in this "
                                          r"order: neg, pos; got 3"):
        make("classification", tokenizer, class_weights=[1, 2, 3]).setup(SKEWED)
    with pytest.raises(ConfigError, match=r"tasks.t.class_weights: expected 3 weights, one per label in this "
                                          r"order: O, B-PER, I-PER; got 1"):
        make("token_classification", tokenizer, class_weights=[1]).setup(
            [{"tokens": ["Bo", "Li"], "tags": ["B-PER", "I-PER"]}])
    for kind in ("classification", "token_classification"):  # caught when the config is read
        with pytest.raises(ConfigError, match=r"tasks.t.class_weights: expected 'balanced'"):
            from_dict(TASKS.get(kind).config_class, {"type": kind, "class_weights": "inverse"}, "tasks.t")
        with pytest.raises(ConfigError, match=r"tasks.t.class_weights: weights must not be negative"):
            from_dict(TASKS.get(kind).config_class, {"type": kind, "class_weights": [1, -1]}, "tasks.t")
    with pytest.raises(ConfigError, match=r"tasks.t.oversample: only for single-label"):
        from_dict(ClassificationConfig, {"type": "classification", "oversample": True, "multi_label": True},
                  "tasks.t")
    with pytest.raises(ConfigError, match=r"tasks.t.tune_threshold: needs a binary or multi-label task"):
        make("classification", tokenizer, tune_threshold=True).setup(SKEWED + [{"text": "x", "label": "mid"}])


def test_token_class_weights_count_word_tags(tokenizer):
    exs = [{"tokens": ["Anna", "went", "home"], "tags": ["B-PER", "O", "O"]},
           {"tokens": ["Schwarzenegger", "Li", "ran"], "tags": ["B-PER", "I-PER", "O"]}]  # a multi-piece word
    task = make("token_classification", tokenizer, class_weights="balanced")
    task.setup(exs)
    assert task.labels == ["O", "B-PER", "I-PER"]
    assert task.weights == pytest.approx([6 / (3 * 3), 6 / (3 * 2), 6 / (3 * 1)])  # words, not sub-tokens
    assert task.state()["class_weights"] == task.weights
    plain = make("token_classification", tokenizer)
    plain.setup(exs)
    width = len(task.encode(exs, tokenizer, 16)[1]["input_ids"])
    logits = torch.zeros(2, width, 3)
    logits[..., 0] = 2.0  # every word predicted O: the rare tags are missed
    weighted, unweighted = loss_of(task, tokenizer, exs, logits), loss_of(plain, tokenizer, exs, logits)
    assert torch.isfinite(weighted) and weighted > unweighted


def test_oversampling_balances_each_epoch_deterministically_and_resumes(tokenizer):
    task = make("classification", tokenizer, oversample=True)
    task.setup(SKEWED)
    feats = task.encode(SKEWED, tokenizer, 16)
    assert task.balance_groups(feats) == [0] * 9 + [1]
    b = TaskBatcher(task, feats, 4, tokenizer.pad_token_id, seed=3)
    for epoch in range(3):
        order = b._permutation(epoch)
        assert Counter(int(feats[i]["labels"]) for i in order) == {0: 9, 1: 9}  # the positive drawn 9 times
        assert set(order.tolist()) == set(range(10))  # every example at least once
    again = TaskBatcher(task, feats, 4, tokenizer.pad_token_id, seed=3)
    assert np.array_equal(b._order, again._order)
    assert not np.array_equal(b._permutation(0), b._permutation(1))
    assert not np.array_equal(b._order, TaskBatcher(task, feats, 4, 0, seed=4)._order)
    for _ in range(6):  # an epoch is 18 long: 5 batches, then into the second epoch
        b.next_batch()
    assert b.epoch == 1
    resumed = TaskBatcher(task, feats, 4, tokenizer.pad_token_id, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for _ in range(7):  # through the end of epoch 1 into epoch 2
        x, y = b.next_batch(), resumed.next_batch()
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert b.epoch == resumed.epoch == 2


def test_without_oversampling_the_order_is_unchanged(tokenizer):
    plain = make("classification", tokenizer)
    plain.setup(SKEWED)
    feats = plain.encode(SKEWED, tokenizer, 16)
    assert plain.balance_groups(feats) is None
    pb = TaskBatcher(plain, feats, 4, 0, seed=3)
    assert np.array_equal(pb._order, np.random.default_rng(3).permutation(10))
    for _ in range(4):  # 4 + 4 + 2, then the first batch of epoch 1
        pb.next_batch()
    assert np.array_equal(pb._order, np.random.default_rng(4).permutation(10))


@pytest.mark.parametrize("kind", ["regression", "masked_lm", "text2text", "token_classification"])
def test_other_tasks_keep_the_default_hooks(kind):
    task = make(kind)
    assert task.balance_groups([{}]) is None
    assert task.calibrate([{}], [{}]) is None
    assert task.confusion([{}], [{}]) is None


def test_best_threshold_ties_go_to_the_one_closest_to_half():
    # any threshold in (0.2, 0.8] separates the classes; 0.5 is a candidate and wins the tie
    assert best_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True], macro=True) == 0.5
    assert best_threshold([0.1, 0.6, 0.7], [False, True, True], macro=False) == 0.5
    assert best_threshold([0.1, 0.55, 0.6], [False, False, True], macro=True) == 0.6


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
    assert task.thresholds[0] == 0.5  # a: 0.5 and 0.7 both separate perfectly; the tie goes to 0.5
    logits = torch.logit(torch.tensor([[s["a"], s["b"]] for s in scores]))
    got = [p["labels"] for p in task.decode(TaskOutput(None, {"logits": logits}), {}, exs)]
    assert got == [["a"], ["a", "b"], ["b"], ["a"]]
    metrics = task.compute_metrics([{"labels": ["a"]}, {"labels": ["a"]}, {"labels": ["a", "b"]}, {"labels": []}],
                                   exs)
    assert metrics["precision/a"] == pytest.approx(2 / 3) and metrics["recall/a"] == pytest.approx(2 / 3)
    assert metrics["precision/b"] == 1.0 and metrics["recall/b"] == 0.5 and metrics["f1/b"] == pytest.approx(2 / 3)


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
    assert set(results["class_weights"]["sentiment"]) == {"negative", "positive"}  # reported
    assert (tmp_path / "run" / "confusion_sentiment.png").is_file()
    model = load(tmp_path / "run")
    assert model.tasks["sentiment"].thresholds == [results["calibration"]["sentiment"]["thresholds"]["positive"]]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "calibrate" for r in rows)
