"""multitune.tasks.metrics gives the numbers of scikit-learn, scipy and seqeval (to 1e-12) on many random
inputs, including the awkward ones (missing classes, one class only, -1 "not a label" predictions, ties,
ill-formed tag sequences); and importing the training code loads none of those libraries."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from seqeval.metrics import f1_score as seqeval_f1
from seqeval.metrics import precision_score as seqeval_precision
from seqeval.metrics import recall_score as seqeval_recall
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from multitune.tasks import metrics
from tests.conftest import REPO

SEEDS = range(30)


def close(ours, reference) -> None:
    np.testing.assert_allclose(np.asarray(ours, dtype=float), np.asarray(reference, dtype=float),
                               rtol=0, atol=1e-12)


def single_label_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Gold and predicted class indices over ``n`` classes: some classes never used, sometimes one class
    only, sometimes -1 (not a label) among the predictions or the gold."""
    n = int(rng.integers(1, 12))
    size = int(rng.integers(1, 120))
    used = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)  # the classes that occur
    gold = rng.choice(used, size=size)
    pred = np.where(rng.random(size) < rng.random(), gold, rng.choice(used, size=size))
    kind = rng.integers(4)
    if kind == 1:  # invalid predictions
        pred = np.where(rng.random(size) < 0.3, -1, pred)
    elif kind == 2:  # invalid on both sides (text2text: a reference outside the label set)
        pred = np.where(rng.random(size) < 0.3, -1, pred)
        gold = np.where(rng.random(size) < 0.2, -1, gold)
    elif kind == 3:  # one class only on one side
        pred = np.full(size, used[0])
    return gold, pred, n


@pytest.mark.parametrize("seed", SEEDS)
def test_single_label_scores_equal_sklearn(seed):
    gold, pred, n = single_label_case(np.random.default_rng(seed))
    labels = list(range(n))
    for g, p in ((gold, pred), (gold.tolist(), pred.tolist())):  # arrays and the lists the tasks pass
        assert metrics.accuracy(g, p) == accuracy_score(g, p)
        close(metrics.macro_f1(g, p, n), f1_score(g, p, labels=labels, average="macro", zero_division=0))
        close(metrics.micro_f1(g, p, n), f1_score(g, p, labels=labels, average="micro", zero_division=0))
        ref = precision_recall_fscore_support(g, p, labels=labels, average=None, zero_division=0)[:3]
        ours = metrics.label_scores(g, p, n)
        for mine, theirs in zip(ours, ref):
            assert mine.shape == (n,)
            close(mine, theirs)


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_label_scores_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, size = int(rng.integers(2, 10)), int(rng.integers(1, 80))  # one column: next test
    density = rng.random(n) * rng.random()  # some labels (nearly) never on
    gold = (rng.random((size, n)) < density).astype(int)
    flip = rng.random((size, n)) < rng.random() * 0.5
    pred = np.where(flip, 1 - gold, gold)
    if seed % 7 == 0:
        pred[:, rng.integers(n)] = 0  # a label never predicted
    if seed % 11 == 0:
        gold[:] = 0  # no gold label at all
    assert metrics.accuracy(gold, pred) == accuracy_score(gold, pred)
    close(metrics.micro_f1(gold, pred), f1_score(gold, pred, average="micro", zero_division=0))
    close(metrics.macro_f1(gold, pred), f1_score(gold, pred, average="macro", zero_division=0))
    ref = precision_recall_fscore_support(gold, pred, labels=list(range(n)), average=None, zero_division=0)[:3]
    for mine, theirs in zip(metrics.label_scores(gold, pred), ref):
        close(mine, theirs)


@pytest.mark.parametrize("seed", range(20))
def test_one_label_indicator_matrix_scores_that_label(seed):
    """A multi-label task with a single label: the one column is that label's indicator. (scikit-learn reads
    an n x 1 matrix as a binary vector and, with ``labels=[0]``, scores the label's *absence*; the numbers
    here are those of the label itself, scikit-learn's binary scores of class 1.)"""
    rng = np.random.default_rng(seed)
    gold = (rng.random((30, 1)) < 0.3).astype(int)
    pred = np.where(rng.random((30, 1)) < 0.3, 1 - gold, gold)
    g, p = gold[:, 0], pred[:, 0]
    binary = precision_recall_fscore_support(g, p, average="binary", zero_division=0)[:3]
    close(np.ravel(metrics.label_scores(gold, pred)), binary)
    close(metrics.macro_f1(gold, pred), binary[2])
    close(metrics.micro_f1(gold, pred), binary[2])
    assert metrics.accuracy(gold, pred) == accuracy_score(g, p)


def test_labels_absent_everywhere_count_in_the_macro_average():
    # labels 2 and 3 occur nowhere: F1 0 each, so the macro-F1 of a perfect prediction is 2/4
    assert metrics.macro_f1([0, 1, 1], [0, 1, 1], 4) == 0.5
    assert metrics.macro_f1([0, -1], [-1, -1], 1) == 0.0


def test_empty_or_mismatched_input_is_an_error():
    with pytest.raises(ValueError):
        metrics.accuracy([], [])
    with pytest.raises(ValueError):
        metrics.macro_f1([0, 1], [0], 2)
    with pytest.raises(ValueError):
        metrics.label_scores([0, 1], [0, 1])  # class indices need n_labels
    with pytest.raises(ValueError):
        metrics.entity_scores([], [])
    with pytest.raises(ValueError):
        metrics.entity_scores([["B-PER", "O"]], [["B-PER"]])


# -- correlations ------------------------------------------------------------------------------------------
def regression_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = int(rng.integers(2, 60))
    gold = rng.normal(size=size) * 10 ** rng.uniform(-3, 6)
    pred = gold * rng.normal() + rng.normal(size=size) * rng.random() * gold.std()
    kind = rng.integers(4)
    if kind == 1:  # ties: a few distinct values (STS-B gold scores are in steps of 0.2)
        gold, pred = np.round(gold / gold.std() * 2) / 5, np.round(pred / (pred.std() or 1))
    elif kind == 2:
        pred = rng.integers(0, 3, size=size).astype(float)  # heavy ties on one side
    if len(set(gold.tolist())) < 2:
        gold[0] += 1.0
    if len(set(pred.tolist())) < 2:
        pred[-1] += 1.0
    return pred, gold


@pytest.mark.parametrize("seed", SEEDS)
def test_correlations_equal_scipy(seed):
    pred, gold = regression_case(np.random.default_rng(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(metrics.pearson(pred, gold), pearsonr(pred, gold)[0])
        close(metrics.spearman(pred, gold), spearmanr(pred, gold)[0])
        close(metrics.spearman(pred.tolist(), gold.tolist()), spearmanr(pred, gold)[0])


def test_correlation_edge_cases_match_scipy():
    cases = [([1.0, 2.0], [3.0, 1.0]), ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, np.nan, 3.0], [1.0, 2.0, 4.0]),
             ([1.0, 2.0, np.inf], [1.0, 2.0, 3.0]), ([1e200, 2e200, 4e200], [1.0, 2.0, 3.0]),
             ([3.0, 3.0, 1.0, 2.0, 2.0], [5.0, 4.0, 4.0, 1.0, 2.0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in cases:
            for ours, theirs in ((metrics.pearson(x, y), pearsonr(x, y)[0]),
                                 (metrics.spearman(x, y), spearmanr(x, y)[0])):
                assert np.isnan(ours) == np.isnan(theirs), (x, y)
                if not np.isnan(ours):
                    close(ours, theirs)


# -- entities ----------------------------------------------------------------------------------------------
TYPES = ("PER", "LOC", "MISC")
WELL_FORMED_MARKERS = {"bio": "BI", "iobes": "BIES"}
# tags that real data should not hold, but that a reader may pass on: no prefix, bare prefixes, a dash
# inside the type, unknown prefixes, the conlleval "." marker
ODD_TAGS = ("PER", "B", "I", "E", "S", "-", ".", "B-", "I-PER-X", "X-PER", "BPER", "S-I-LOC", ".-PER", "o")


def tag_sequences(rng: np.random.Generator, scheme: str, odd: float) -> list[list[str]]:
    markers = WELL_FORMED_MARKERS[scheme]
    vocab = ["O"] * 3 + [f"{m}-{t}" for m in markers for t in TYPES]
    sentences = []
    for _ in range(int(rng.integers(1, 8))):
        length = int(rng.integers(0, 15))
        tags = [str(rng.choice(ODD_TAGS)) if rng.random() < odd else str(rng.choice(vocab)) for _ in range(length)]
        sentences.append(tags)
    return sentences


def perturbed(rng: np.random.Generator, gold: list[list[str]], scheme: str, odd: float) -> list[list[str]]:
    """Predictions: mostly the gold tags, some replaced by random ones (I- after O, type switches...)."""
    noise = tag_sequences(rng, scheme, odd)[0] or ["O"]
    rate = rng.random()
    return [[str(rng.choice(noise)) if rng.random() < rate else tag for tag in sentence] for sentence in gold]


@pytest.mark.parametrize("scheme", ["bio", "iobes"])
@pytest.mark.parametrize("seed", SEEDS)
def test_entity_scores_equal_seqeval(seed, scheme):
    rng = np.random.default_rng(seed)
    odd = 0.0 if seed % 3 else 0.15  # every third case with ill-formed tags beyond I- after O
    gold = tag_sequences(rng, scheme, odd)
    pred = perturbed(rng, gold, scheme, odd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns about tags without a prefix
        reference = (seqeval_precision(gold, pred, zero_division=0), seqeval_recall(gold, pred, zero_division=0),
                     seqeval_f1(gold, pred, zero_division=0))
    close(metrics.entity_scores(gold, pred), reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(metrics.entity_scores(gold, gold)[2], seqeval_f1(gold, gold, zero_division=0))


def test_entity_examples():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["I-MISC", "O"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"], ["B-MISC", "B-MISC"]]
    # gold: PER 0-1, LOC 3 (entity ends at the sentence end), MISC 5 (a stray I- opens an entity)
    # pred: PER 0-1, LOC 3, MISC 5, MISC 6
    assert metrics.entity_scores(gold, pred) == (0.75, 1.0, pytest.approx(6 / 7))
    # sentences are joined with an O between them: an entity never runs across a sentence boundary
    assert metrics.entity_scores([["I-PER"], ["I-PER"]], [["I-PER"], ["I-PER"]]) == (1.0, 1.0, 1.0)
    assert metrics.entity_scores([["O"], []], [["O"], []]) == (0.0, 0.0, 0.0)


# -- import cost -------------------------------------------------------------------------------------------
def test_training_imports_no_heavy_metric_library():
    """The training code computes its metrics without scikit-learn, scipy, pandas or seqeval, which would
    cost a training process seconds of imports before its first step. (transformers imports scipy itself
    once model code loads, ``transformers.modeling_utils``; that is outside multitune's imports.)"""
    code = ("import multitune.training, multitune.tasks, multitune.weighting, multitune.cli, sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'sklearn','scipy','pandas','seqeval'}))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env=env, timeout=300)
    assert out.stdout.strip() == "[]"
