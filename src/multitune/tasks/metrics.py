"""Evaluation metrics of the built-in tasks, in numpy alone.

The numbers are those of the usual references (scikit-learn's ``accuracy_score`` / ``f1_score`` /
``precision_recall_fscore_support`` with ``zero_division=0``, scipy's ``pearsonr`` / ``spearmanr``, seqeval's
default entity-level scores); ``tests/test_metrics.py`` checks them against those libraries on random inputs.
They are computed here because importing scikit-learn, scipy and seqeval (which pull in pandas) costs a
training process seconds before its first step, for a handful of sums.

Classification metrics take either class indices (one per example; a value outside ``range(n_labels)``,
such as -1 for "not a label", is never a true or predicted positive of any label) or 0/1 indicator
matrices (one row per example, one column per label: multi-label). An undefined ratio (no predicted, or
no gold, positive) is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["accuracy", "entity_scores", "label_scores", "macro_f1", "micro_f1", "pearson", "spearman"]


def _pair(gold: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    gold_arr, pred_arr = np.asarray(gold), np.asarray(pred)
    if gold_arr.shape != pred_arr.shape:
        raise ValueError(f"gold and predictions differ in shape: {gold_arr.shape} vs {pred_arr.shape}")
    if gold_arr.ndim not in (1, 2) or len(gold_arr) == 0:
        raise ValueError(f"expected a non-empty vector of class indices or indicator matrix; got shape "
                         f"{gold_arr.shape}")
    return gold_arr, pred_arr


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(denominator), where=denominator != 0)


def _counts(gold: np.ndarray, pred: np.ndarray, n_labels: int | None) -> tuple[np.ndarray, ...]:
    """Per label: true positives, predicted positives, gold positives."""
    if gold.ndim == 2:  # indicator matrices: a column per label
        gold_on, pred_on = gold != 0, pred != 0
        return ((gold_on & pred_on).sum(axis=0), pred_on.sum(axis=0), gold_on.sum(axis=0))
    if n_labels is None:
        raise ValueError("n_labels is needed for class indices")

    def per_label(values: np.ndarray) -> np.ndarray:
        values = values.astype(np.int64)
        return np.bincount(values[(values >= 0) & (values < n_labels)], minlength=n_labels)

    return per_label(gold[gold == pred]), per_label(pred), per_label(gold)


def accuracy(gold: Any, pred: Any) -> float:
    """The fraction of examples predicted exactly right (multi-label: every label of the row right).

    Args:
        gold: gold class index per example, or an indicator matrix (examples x labels).
        pred: the predictions, in the same form.

    Returns:
        The accuracy, in [0, 1].

    Raises:
        ValueError: empty input, or gold and predictions of different shapes.
    """
    gold_arr, pred_arr = _pair(gold, pred)
    right = gold_arr == pred_arr
    if right.ndim == 2:
        right = right.all(axis=1)
    return float(np.mean(right))


def label_scores(gold: Any, pred: Any,
                 n_labels: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of each label, each label scored as the positive class against the rest.

    Args:
        gold: gold class index per example, or an indicator matrix (examples x labels).
        pred: the predictions, in the same form.
        n_labels: class indices: the labels are ``0 .. n_labels - 1`` (labels that occur in neither gold
            nor predictions score 0); ignored for indicator matrices, whose columns are the labels.

    Returns:
        ``(precision, recall, f1)``, three float arrays with one value per label.

    Raises:
        ValueError: empty input, shapes that differ, or class indices without ``n_labels``.
    """
    tp, predicted, actual = _counts(*_pair(gold, pred), n_labels)
    return _ratio(tp, predicted), _ratio(tp, actual), _ratio(2 * tp, actual + predicted)


def macro_f1(gold: Any, pred: Any, n_labels: int | None = None) -> float:
    """The unweighted mean over labels of each label's F1 (labels absent from gold and predictions count,
    with F1 0).

    Args:
        gold: gold class index per example, or an indicator matrix (examples x labels).
        pred: the predictions, in the same form.
        n_labels: class indices: the labels are ``0 .. n_labels - 1``; ignored for indicator matrices.

    Returns:
        The macro-F1, in [0, 1].

    Raises:
        ValueError: as :func:`label_scores`.
    """
    return float(np.mean(label_scores(gold, pred, n_labels)[2]))


def micro_f1(gold: Any, pred: Any, n_labels: int | None = None) -> float:
    """F1 of the true, predicted and gold positives pooled over all labels.

    Args:
        gold: gold class index per example, or an indicator matrix (examples x labels).
        pred: the predictions, in the same form.
        n_labels: class indices: the labels are ``0 .. n_labels - 1``; ignored for indicator matrices.

    Returns:
        The micro-F1, in [0, 1].

    Raises:
        ValueError: as :func:`label_scores`.
    """
    tp, predicted, actual = (c.sum() for c in _counts(*_pair(gold, pred), n_labels))
    return float(_ratio(2 * tp, actual + predicted))


def pearson(x: Any, y: Any) -> float:
    """Pearson's correlation coefficient of two samples.

    Args:
        x: one value per example.
        y: the paired values, as many.

    Returns:
        The coefficient in [-1, 1]; NaN when a sample is constant or holds a NaN or an infinity.

    Raises:
        ValueError: samples of different lengths, or fewer than two values.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"expected two vectors of equal length >= 2; got shapes {a.shape} and {b.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = a - a.mean(), b - b.mean()
        # scaled to a largest deviation of 1 first, so that squaring large values cannot overflow
        a, b = a / np.abs(a).max(), b / np.abs(b).max()
        r = (a @ b) / np.sqrt((a @ a) * (b @ b))
    return float(np.clip(r, -1.0, 1.0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # the sorted positions where a run of equal values begins, and one past the last
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks starts+1 .. ends
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation: Pearson's coefficient of the ranks, ties ranked by their average rank.

    Args:
        x: one value per example.
        y: the paired values, as many.

    Returns:
        The coefficient in [-1, 1]; NaN when a sample is constant or holds a NaN.

    Raises:
        ValueError: samples of different lengths, or fewer than two values.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"expected two vectors of equal length >= 2; got shapes {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    return pearson(_average_ranks(a), _average_ranks(b))


# -- entity-level scores of tag sequences ------------------------------------------------------------------
# A chunk (entity) is read off the tags the way the CoNLL shared tasks' conlleval script reads it, which is
# also seqeval's default (non-strict) mode: ill-formed sequences (I- after O, a type switch inside a chunk)
# still give chunks rather than errors. Each tag is split into a one-letter position marker and a type:
# "B-PER" -> ("B", "PER"); a tag without a dash keeps its first letter as the marker and the rest as the
# type ("PER" -> ("P", "ER")); an empty type is "_" (so "O" -> ("O", "_")).

_OUTSIDE = ("O", ".")  # markers that belong to no chunk ("." marks punctuation in some old CoNLL data)


def _split_tag(tag: str) -> tuple[str, str]:
    marker, rest = tag[:1], tag[1:]
    _, dash, after = rest.partition("-")
    return marker, (after if dash else rest) or "_"


def _closes(prev: tuple[str, str], cur: tuple[str, str]) -> bool:
    """Whether a chunk that the previous tag belongs to ends before the current tag."""
    (prev_mark, prev_type), (mark, kind) = prev, cur
    if prev_mark in ("E", "S"):  # single- or last-token markers always close
        return True
    if prev_mark in ("B", "I") and mark in ("B", "S", "O"):
        return True
    return prev_mark not in _OUTSIDE and prev_type != kind


def _opens(prev: tuple[str, str], cur: tuple[str, str]) -> bool:
    """Whether a new chunk begins at the current tag."""
    (prev_mark, prev_type), (mark, kind) = prev, cur
    if mark in ("B", "S"):
        return True
    if mark in ("I", "E") and prev_mark in ("E", "S", "O"):  # a continuation with nothing to continue
        return True
    return mark not in _OUTSIDE and prev_type != kind


def _chunks(sentences: Sequence[Sequence[str]]) -> set[tuple[str, int, int]]:
    """``(type, first, last)`` of every chunk; positions count through the sentences, joined with one "O"
    after each."""
    tags = [tag for sentence in sentences for tag in [*sentence, "O"]]
    found = set()
    prev, start = _split_tag("O"), 0  # as if an O came first
    for i, tag in enumerate([*tags, "O"]):
        cur = _split_tag(tag)
        if _closes(prev, cur):
            found.add((prev[1], start, i - 1))
        if _opens(prev, cur):
            start = i
        prev = cur
    return found


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> tuple[float, float, float]:
    """Entity-level precision, recall and F1 of tag sequences (BIO, IOBES and the like), micro-averaged: a
    predicted entity is right when one gold entity has exactly its type and span.

    Entities are read as the CoNLL ``conlleval`` script reads them (seqeval's default mode gives the same
    numbers): ill-formed sequences such as an ``I-`` after ``O`` or a type switch still yield entities.

    Args:
        gold: the gold tags, one list per sentence.
        pred: the predicted tags, one list per sentence, as long as the gold ones.

    Returns:
        ``(precision, recall, f1)``, each 0 where undefined (no predicted or no gold entities).

    Raises:
        ValueError: no sentences, or sentence counts or lengths that differ.
    """
    if not gold or [len(s) for s in gold] != [len(s) for s in pred]:
        raise ValueError(f"expected as many predicted as gold sentences, of the same lengths; got "
                         f"{len(pred)} and {len(gold)} sentences")
    gold_chunks, pred_chunks = _chunks(gold), _chunks(pred)
    right = len(gold_chunks & pred_chunks)
    precision = float(_ratio(right, len(pred_chunks)))
    recall = float(_ratio(right, len(gold_chunks)))
    f1 = float(_ratio(2 * precision * recall, precision + recall))
    return precision, recall, f1
