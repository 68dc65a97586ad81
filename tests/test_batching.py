"""Batch building: length-grouped batches cover every example once per epoch, cut padding, stay random
across batches and resume exactly; the optimizer uses the fused AdamW kernel where there is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multitune.config.parse import from_dict
from multitune.optim import build_optimizer
from multitune.tasks import TASKS
from multitune.training.batching import TaskBatcher, feature_length, padding_share
from multitune.training.progress import fast_path_summary


def _task():
    impl = TASKS.get("classification")
    task = impl("sentiment", from_dict(impl.config_class, {"type": "classification", "labels": ["a", "b"]}))
    task.setup([])
    return task


def _features(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 120, n)  # a long tail, like real sentence lengths
    # the first id tells the examples apart
    return [{"input_ids": [i + 10] + [7] * (int(k) - 1), "labels": int(i % 2)} for i, k in enumerate(lengths)]


def _epoch(batcher, n):
    batches, seen = [], 0
    while seen < n:
        b = batcher.next_batch()
        batches.append(b)
        seen += len(b["input_ids"])
    return batches


def _padding(batches):
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    return 1 - real / padded


def test_grouped_epoch_covers_every_example_once_with_little_padding():
    feats = _features()
    plain = _epoch(TaskBatcher(_task(), feats, 32, 0, seed=1), len(feats))
    grouped = _epoch(TaskBatcher(_task(), feats, 32, 0, seed=1, group_by_length=True), len(feats))
    ids = sorted(int(x) for b in grouped for x in b["input_ids"][:, 0])
    assert ids == [i + 10 for i in range(len(feats))]
    assert _padding(plain) > 0.4 and _padding(grouped) < 0.1
    # batches are not globally sorted: the batch order is shuffled
    widths = [b["input_ids"].shape[1] for b in grouped[:-1]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_padding_share_is_what_the_collated_epoch_pads():
    """The run's printed padding share, computed from lengths alone, equals the padding of the batches the
    batcher then collates, with and without grouping, over two tasks."""
    feats, other = _features(), _features(300, seed=3)
    for grouped in (False, True):
        batchers = [TaskBatcher(_task(), f, 32, 0, seed=s, group_by_length=grouped) for f, s in ((feats, 1),
                                                                                                (other, 2))]
        share = padding_share(batchers, grouped)
        batches = _epoch(batchers[0], len(feats)) + _epoch(batchers[1], len(other))
        assert share == pytest.approx(_padding(batches), abs=1e-9)
    assert padding_share(batchers, False) > 0.4 > 0.1 > padding_share(batchers, True)
    assert padding_share([], True) is None


def test_fast_path_line_says_what_a_setting_that_is_off_costs():
    on = fast_path_summary("bf16", "auto", True, True, 0.08, 0.46)
    assert on == ("fast path: bf16 autocast (precision: auto); length grouping: 8% of training tokens are padding "
                  "(46% without it)")
    off = fast_path_summary("fp32", "fp32", True, False, 0.46, 0.08)
    assert "precision: auto would use it" in off and "46% of training tokens are padding (8% with group_by_length" \
        in off
    assert "no native bf16" in fast_path_summary("fp32", "auto", False, True, 0.1, 0.4)
    assert "unpadded" not in on
    assert fast_path_summary("bf16", "auto", True, False, 0.4, 0.1, unpadded=True).endswith(
        "; encoder unpadded: embeddings, projections and feed-forward blocks skip the padding")
    words = fast_path_summary("bf16", "auto", True, True, 0.08, 0.46, (11_720_448, True))
    assert words.endswith("word embeddings frozen (11.7M parameters; freeze.word_embeddings: false trains them)")
    assert "word embeddings train (11.7M parameters; the default freezes them)" in fast_path_summary(
        "bf16", "auto", True, True, 0.08, 0.46, (11_720_448, False))
    assert "word embeddings" not in fast_path_summary("bf16", "auto", True, True, 0.08, 0.46, (0, True))


def test_grouped_stream_is_seeded_and_resumes_exactly():
    feats = _features(300)
    a = TaskBatcher(_task(), feats, 16, 0, seed=5, group_by_length=True)
    first = [a.next_batch() for _ in range(30)]  # crosses an epoch boundary (19 batches per epoch)
    b = TaskBatcher(_task(), feats, 16, 0, seed=5, group_by_length=True)
    for _ in range(12):
        b.next_batch()
    resumed = TaskBatcher(_task(), feats, 16, 0, seed=5, group_by_length=True)
    resumed.load_state_dict(b.state_dict())
    for want in first[12:]:
        got = resumed.next_batch()
        assert all(torch.equal(want[k], got[k]) for k in want)
    other = TaskBatcher(_task(), feats, 16, 0, seed=6, group_by_length=True)
    assert not torch.equal(other.next_batch()["input_ids"], first[0]["input_ids"])
    # every epoch is a new grouping
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first[:5], first[19:24]))


def _correlated_features(n=960, seed=0):
    """Class 1 is three times as long as class 0 on average, as in paraphrase data where length tells the
    label: plain length sorting puts the classes into different batches."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    lengths = np.where(labels == 1, rng.integers(30, 90, n), rng.integers(5, 40, n))
    return [{"input_ids": [i + 10] + [7] * (int(k) - 1), "labels": int(y)}
            for i, (k, y) in enumerate(zip(lengths, labels))]


def _minority_share(batches):
    """Per full batch, the share of its less frequent class."""
    shares = []
    for b in batches:
        if len(b["labels"]) == 32:
            ones = float(b["labels"].float().mean())
            shares.append(min(ones, 1 - ones))
    return np.array(shares)


def test_grouped_batches_keep_the_label_mix_when_length_tells_the_label():
    feats = _correlated_features()
    task = _task()
    plain = _epoch(TaskBatcher(task, feats, 32, 0, seed=3), len(feats))
    grouped = _epoch(TaskBatcher(task, feats, 32, 0, seed=3, group_by_length=True), len(feats))
    assert task.length_strata(feats) == [f["labels"] for f in feats]
    overall = float(np.mean([f["labels"] for f in feats]))
    # each batch holds the window's class mix to within a row or two per class
    assert np.all(_minority_share(grouped) >= min(overall, 1 - overall) - 3 / 32)
    # the price of the mix where the classes' lengths barely overlap: less padding saved than by length alone
    assert _padding(grouped) < 0.75 * _padding(plain)

    class LengthOnly(type(task)):  # the same task without strata: grouping by length alone
        def length_strata(self, features):
            return None

    alone = LengthOnly("sentiment", task.config)
    alone.setup([])
    one_sided = _epoch(TaskBatcher(alone, feats, 32, 0, seed=3, group_by_length=True), len(feats))
    assert np.mean(_minority_share(one_sided) < 0.1) > 0.3  # what the strata prevent: many one-sided batches


def test_feature_length_counts_both_sides_and_targets():
    assert feature_length({"input_ids": [1, 2, 3], "labels": 1}) == 3
    assert feature_length({"input_ids": [1, 2], "pair_input_ids": [3, 4, 5]}) == 5
    assert feature_length({"input_ids": [1, 2], "labels": [4, 5, 6, 7]}) == 6


def test_optimizer_is_fused_on_cpu_and_matches_the_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = build_optimizer([{"params": params, "lr": 1e-2, "weight_decay": 0.01}], 1e-2)
    loop = torch.optim.AdamW([{"params": twins, "lr": 1e-2, "weight_decay": 0.01}], lr=1e-2)
    assert fused.defaults["fused"]
    for _ in range(5):
        for p, q in zip(params, twins):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        fused.step()
        loop.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)

