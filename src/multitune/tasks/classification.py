"""Sentence and sentence-pair classification, single-label or multi-label."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from multitune.config.parse import field
from multitune.config.schema import TaskConfig
from multitune.data.readers import rows_where
from multitune.errors import ConfigError, DataError, shown
from multitune.tasks import metrics as task_metrics
from multitune.tasks.base import (
    DENSE_CONFUSION_LABELS,
    NEW_HEAD_LEARNING_RATE,
    PROBE_TEXTS,
    SENTENCE_HEADS,
    TASKS,
    CountRow,
    EncoderCall,
    ExportSpec,
    LinearHead,
    PoolerHead,
    Task,
    TaskOutput,
    check_class_weights,
    class_weights,
    collate_inputs,
    label_sort_key,
    resolve_sentence_head,
    tokenize_texts,
    warm_start_pooler,
    where,
)

# what ``tasks.<name>.metric`` (the task's main metric) may name, by kind of task
SINGLE_LABEL_METRICS = ("accuracy", "macro_f1", "mcc", "f1")  # f1: binary tasks only
MULTI_LABEL_METRICS = ("accuracy", "macro_f1", "micro_f1")  # micro F1 of a single-label task is its accuracy
MAIN_METRICS = tuple(dict.fromkeys(SINGLE_LABEL_METRICS + MULTI_LABEL_METRICS))


@dataclass
class ClassificationConfig(TaskConfig):
    multi_label: bool = field(False, help="each example may carry several labels (sigmoid + BCE)")
    label_separator: str = field(",", help="multi-label: separator of labels inside one text field")
    head: str = field("pooled", help="pooled: the pooled sentence embedding -> linear; pooler: first token -> "
                                     "dense (from the backbone's pooler) -> tanh -> linear, BERT's layout, which "
                                     "exports as the stock AutoModelForSequenceClassification; auto: pooler on "
                                     "encoder backbones, pooled on the others",
                      choices=list(SENTENCE_HEADS))
    dropout: float = field(0.1, help="dropout before the classifier", min=0.0, max=0.9)
    threshold: float = field(0.5, help="multi-label: probability above which a label is predicted",
                             gt=0.0, max=1.0)
    # multi-label: the weights are BCE pos_weights ('balanced': negatives / positives per label)
    class_weights: str | list[float] | None = field(None, help="'balanced' (inverse class frequency in train) or "
                                                              "one loss weight per label, in label order")
    oversample: bool = field(False, help="single-label: draw minority classes up to the majority count in each "
                                         "epoch of this task's batches")
    tune_threshold: bool = field(False, help="binary / multi-label: pick the decision threshold(s) that maximise "
                                             "F1 on validation after training; saved and used by predict")
    metric: str = field("accuracy", help="the task's main metric: what early stopping's 'mean' averages and "
                                         "per-task model selection maximises. mcc (Matthews correlation) and f1 "
                                         "(F1 of positive_label, binary tasks only) are for single-label tasks, "
                                         "micro_f1 for multi-label ones", choices=list(MAIN_METRICS))
    positive_label: str | None = field(None, help="binary: the positive class that the f1 metric scores "
                                                  "(default: the second label in label order, label id 1: '1', "
                                                  "'positive' or 'true' when labels are inferred and sorted, "
                                                  "label 1 of a dataset's ClassLabel)")

    def validate(self, path: str) -> None:
        prefix = f"{path}." if path else ""
        check_class_weights(self.class_weights, prefix + "class_weights")
        if self.oversample and self.multi_label:
            raise ConfigError(prefix + "oversample", "only for single-label classification (multi_label is true)")
        allowed = MULTI_LABEL_METRICS if self.multi_label else SINGLE_LABEL_METRICS
        if self.metric not in allowed:
            kind = "multi-label" if self.multi_label else "single-label"
            raise ConfigError(prefix + "metric", f"{self.metric} is not reported by a {kind} task; expected one "
                                                 f"of: {', '.join(allowed)}")
        if self.multi_label and self.positive_label is not None:
            raise ConfigError(prefix + "positive_label", "only for binary single-label classification "
                                                         "(multi_label is true)")
        if self.labels:  # else checked once the labels are known (ClassificationTask.setup)
            positive_index(self.labels, self.positive_label, self.metric, prefix, self.multi_label)


@TASKS.register("classification")
class ClassificationTask(Task):
    """Pooled sentence (or pair) embedding -> linear classifier.

    Metrics: ``accuracy`` (subset accuracy for multi-label), ``macro_f1``, and per label ``precision/<label>``,
    ``recall/<label>``, ``f1/<label>``; single-label tasks add ``mcc`` (Matthews correlation, multi-class
    too) and, with exactly two labels, ``f1`` (F1 of ``positive_label``); multi-label tasks add ``micro_f1``
    (no ``mcc``: it has no standard multi-label form). The main metric is the config's ``metric``.

    Class imbalance: ``class_weights`` weight the loss, ``oversample`` balances the batches (through
    :meth:`balance_groups`), ``tune_threshold`` picks decision thresholds on validation (:meth:`calibrate`).
    """

    config_class = ClassificationConfig
    fields = ("text", "text_pair", "label")
    required = ("text", "label")
    stratify_key = "label"
    main_metric = "accuracy"
    label_field = "label"

    def __init__(self, name: str, config: ClassificationConfig):
        super().__init__(name, config)
        self.labels: list[str] = list(config.labels) if config.labels else []
        self.weights: list[float] | None = None
        self.thresholds: list[float] | None = None  # binary: [p(second label)]; multi-label: one per label
        self.head_layout: str | None = None  # config.head resolved on the backbone (bind), or a saved model's
        self.main_metric = config.metric
        self.positive: int | None = None  # binary: index of the label the f1 metric scores (set in setup)

    def bind(self, architecture, tokenizer) -> None:
        super().bind(architecture, tokenizer)
        if self.head_layout is None:
            self.head_layout = resolve_sentence_head(self.config.head, architecture)

    # -- labels ----------------------------------------------------------------------
    def _example_labels(self, example: dict) -> list[str]:
        raw = example.get("label")
        if self.config.multi_label:
            if raw is None:  # no label applies
                return []
            if isinstance(raw, (list, tuple)):
                return [str(v).strip() for v in raw]
            return [p.strip() for p in str(raw).split(self.config.label_separator) if p.strip()]
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if raw is None or not str(raw).strip():  # else a blank cell would become a class of its own
            file, line = where(example)
            raise DataError(file, "empty label; expected one label per example"
                                  + (f" ({', '.join(self.labels)})" if self.labels else ""), line)
        return [str(raw).strip()]

    def _check_labels_present(self, examples: Sequence[dict]) -> None:
        """Every single-label example has a label; else one error naming how many rows have none and where."""
        if self.config.multi_label:
            return
        empty = [ex for ex in examples if ex.get("label") is None or not str(ex.get("label")).strip()]
        if empty:
            file, line = where(empty[0])
            lines = [where(ex)[1] for ex in empty if where(ex)[0] == file and where(ex)[1] is not None]
            count = rows_where(lines, "no label") if lines else f"{len(empty)} rows have no label"
            raise DataError(file, f"empty label; {count}; expected one label per example"
                                  + (f" ({', '.join(self.labels)})" if self.labels else ""), line)

    def setup(self, train_examples: Sequence[dict]) -> None:
        self._check_labels_present(train_examples)
        self.pair_input = any(ex.get("text_pair") for ex in train_examples)
        if not self.labels:
            found = {lab for ex in train_examples for lab in self._example_labels(ex)}
            self.labels = sorted(found, key=label_sort_key)
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}
        self.weights = None
        if self.config.class_weights is not None:
            self.check_examples(train_examples)
            counts = self.class_counts(train_examples)
            if self.config.multi_label and self.config.class_weights == "balanced":
                # BCE pos_weight per label: negatives / positives (a label never seen positive gets 1)
                n = len(train_examples)
                self.weights = [(n - c) / c if c else 1.0 for c in counts]
            else:  # single-label: cross-entropy weight; multi-label: a given list is the BCE pos_weight
                self.weights = class_weights(self.config.class_weights, counts, self.labels,
                                             f"tasks.{self.name}.class_weights")
        if self.config.tune_threshold and not (self.config.multi_label or len(self.labels) == 2):
            raise ConfigError(f"tasks.{self.name}.tune_threshold", f"needs a binary or multi-label task; "
                                                                   f"{self.name!r} has {len(self.labels)} labels")
        self.main_metric = self.config.metric
        self.positive = positive_index(self.labels, self.config.positive_label, self.config.metric,
                                       f"tasks.{self.name}.", self.config.multi_label)

    def check_examples(self, examples: Sequence[dict]) -> None:
        self._check_labels_present(examples)
        for ex in examples:
            for lab in self._example_labels(ex):
                if lab not in self.label_index:
                    file, line = where(ex)
                    raise DataError(file, f"label {lab!r} is not in the label set of task {self.name!r} "
                                          f"({', '.join(self.labels)})", line)

    def class_counts(self, examples: Sequence[dict]) -> list[int]:
        counts = [0] * len(self.labels)
        for ex in examples:
            for lab in self._example_labels(ex):
                counts[self.label_index[lab]] += 1
        return counts

    # -- data ------------------------------------------------------------------------
    def encode(self, examples: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict]:
        has_pair = any(ex.get("text_pair") is not None for ex in examples)
        pairs = [ex.get("text_pair") or "" for ex in examples] if has_pair else None
        feats = tokenize_texts(tokenizer, [ex["text"] for ex in examples], pairs, max_length)
        for feat, ex in zip(feats, examples):
            if ex.get("label") is not None:
                idx = [self.label_index[lab] for lab in self._example_labels(ex)]
                feat["labels"] = idx if self.config.multi_label else idx[0]
        return feats

    def collate(self, features, pad_token_id, generator=None):
        batch = collate_inputs(features, pad_token_id)
        if "labels" in features[0]:
            if self.config.multi_label:
                target = torch.zeros(len(features), len(self.labels))
                for i, f in enumerate(features):
                    target[i, f["labels"]] = 1.0
                batch["labels"] = target
            else:
                batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch

    # -- model -----------------------------------------------------------------------
    def build_head(self, hidden_size: int) -> nn.Module:
        if self.head_layout == "pooler":
            return PoolerHead(hidden_size, len(self.labels), self.config.dropout)
        return LinearHead(hidden_size, len(self.labels), self.config.dropout)

    def new_head_learning_rate(self) -> float | None:
        # measured for the linear head; a pooler head starts from the backbone's pretrained pooler
        return None if self.head_layout == "pooler" else NEW_HEAD_LEARNING_RATE

    def warm_start_head(self, head: nn.Module, backbone: nn.Module) -> None:
        warm_start_pooler(head, backbone)

    def forward(self, model, head, batch) -> TaskOutput:
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        pooled = hidden if isinstance(head, PoolerHead) else model.pool(hidden, batch["attention_mask"])
        logits = head(pooled).float()
        loss = None
        if "labels" in batch:
            weight = None if self.weights is None else torch.tensor(self.weights, device=logits.device)
            if self.config.multi_label:
                loss = F.binary_cross_entropy_with_logits(logits, batch["labels"], pos_weight=weight)
            else:
                loss = F.cross_entropy(logits, batch["labels"], weight=weight)
        return TaskOutput(loss, {"logits": logits})

    def encoder_inputs(self, batch) -> list[EncoderCall]:
        return [(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))]

    # -- results ---------------------------------------------------------------------
    def decode(self, output, batch, examples) -> list[dict]:
        logits = output.outputs["logits"]
        probs = torch.sigmoid(logits) if self.config.multi_label else torch.softmax(logits, dim=-1)
        preds = []
        for row in probs.tolist():
            scores = {lab: round(p, 6) for lab, p in zip(self.labels, row)}
            if self.config.multi_label:
                cut = self.thresholds or [self.config.threshold] * len(self.labels)
                chosen = [lab for lab, p, t in zip(self.labels, row, cut) if round(p, 6) >= t]
                preds.append({"labels": chosen, "scores": scores})
            else:
                if self.thresholds is not None:  # binary with a tuned threshold on the second label
                    best = 1 if round(row[1], 6) >= self.thresholds[0] else 0  # thresholds are 6-digit
                else:
                    best = int(np.argmax(row))
                preds.append({"label": self.labels[best], "score": round(row[best], 6), "scores": scores})
        return preds

    def compute_metrics(self, predictions, examples) -> dict[str, float]:
        n = len(self.labels)
        if self.config.multi_label:
            gold = np.zeros((len(examples), n), dtype=int)
            pred = np.zeros((len(examples), n), dtype=int)
            for i, (p, ex) in enumerate(zip(predictions, examples)):
                gold[i, [self.label_index[lab] for lab in self._example_labels(ex)]] = 1
                pred[i, [self.label_index[lab] for lab in p["labels"]]] = 1
            metrics = {"accuracy": task_metrics.accuracy(gold, pred),
                       "micro_f1": task_metrics.micro_f1(gold, pred),
                       "macro_f1": task_metrics.macro_f1(gold, pred)}
            return metrics | self._per_label(gold, pred)
        gold = [self.label_index[self._example_labels(ex)[0]] for ex in examples]
        pred = [self.label_index[p["label"]] for p in predictions]
        metrics = {"accuracy": task_metrics.accuracy(gold, pred),
                   "macro_f1": task_metrics.macro_f1(gold, pred, n),
                   "mcc": matthews_correlation(gold, pred, n)}
        per_label = self._per_label(gold, pred)
        if self.positive is not None:
            metrics["f1"] = per_label[f"f1/{self.labels[self.positive]}"]
        return metrics | per_label

    def _per_label(self, gold: Any, pred: Any) -> dict[str, float]:
        """``precision/<label>``, ``recall/<label>``, ``f1/<label>`` (class indices or indicator matrices)."""
        prec, rec, f1 = task_metrics.label_scores(gold, pred, len(self.labels))
        metrics = {}
        for i, lab in enumerate(self.labels):
            metrics[f"precision/{lab}"] = float(prec[i])
            metrics[f"recall/{lab}"] = float(rec[i])
            metrics[f"f1/{lab}"] = float(f1[i])
        return metrics

    # -- imbalance -------------------------------------------------------------------
    def balance_groups(self, features: Sequence[dict]) -> list[int] | None:
        """With ``oversample``: the gold class index of each training feature (one group per class).

        Raises:
            ConfigError: ``oversample`` on a multi-label task (a config that skipped validation).
        """
        if not self.config.oversample:
            return None
        if self.config.multi_label:
            raise ConfigError(f"tasks.{self.name}.oversample", "only for single-label classification")
        return [int(f["labels"]) for f in features]

    def length_strata(self, features: Sequence[dict]) -> list[int] | None:
        """Single-label: each feature's class, so that length-grouped batches keep the class mix (multi-label:
        length alone)."""
        if self.config.multi_label or not features or "labels" not in features[0]:
            return None
        return [int(f["labels"]) for f in features]

    def calibrate(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict | None:
        """With ``tune_threshold``: pick the thresholds that maximise F1 on validation and keep them in
        :meth:`state`, so that :meth:`decode` (and a loaded model) applies them.

        Binary: the threshold on p(second label) that maximises macro-F1 (label = second iff p >= threshold).
        Multi-label: one threshold per label, maximising that label's F1. Candidates are the predicted
        probabilities (``scores`` of the predictions) and 0.5; ties go to the one closest to 0.5.

        Returns:
            ``{"thresholds": {label: threshold}}`` (binary: only the second label), or None without
            ``tune_threshold`` or predictions.
        """
        if not self.config.tune_threshold or not predictions:
            return None
        probs = np.array([[p["scores"][lab] for lab in self.labels] for p in predictions], dtype=float)
        if self.config.multi_label:
            gold = np.zeros(probs.shape, dtype=bool)
            for i, ex in enumerate(examples):
                gold[i, [self.label_index[lab] for lab in self._example_labels(ex)]] = True
            self.thresholds = [best_threshold(probs[:, j], gold[:, j], macro=False) for j in range(len(self.labels))]
            tuned = self.labels
        else:
            gold = np.array([self.label_index[self._example_labels(ex)[0]] == 1 for ex in examples])
            self.thresholds = [best_threshold(probs[:, 1], gold, macro=True)]
            tuned = self.labels[1:]
        return {"thresholds": dict(zip(tuned, self.thresholds))}

    def confusion(self, predictions: Sequence[dict], examples: Sequence[dict]
                  ) -> tuple[list[str], list[list[int]]] | None:
        """Single-label: ``(labels, counts[gold][predicted])``; multi-label: None."""
        if self.config.multi_label:
            return None
        n = len(self.labels)
        # many labels: sparse rows (a dense 10,000-label matrix would be 100 million cells, mostly zero)
        counts = [[0] * n for _ in range(n)] if n <= DENSE_CONFUSION_LABELS else [CountRow(n) for _ in range(n)]
        for p, ex in zip(predictions, examples):
            counts[self.label_index[self._example_labels(ex)[0]]][self.label_index[p["label"]]] += 1
        return list(self.labels), counts

    def export_spec(self) -> ExportSpec:
        """``AutoModelForSequenceClassification``: ``logits`` are the classifier's; the pipeline's softmax
        (sigmoid for multi-label) gives :meth:`decode`'s scores. Tuned thresholds are in ``config.json``
        (``multitune_thresholds``) and the model card; stock pipelines take the argmax / 0.5."""
        probes = list(PROBE_TEXTS)
        if self.pair_input:
            probes = [(a, b) for a, b in zip(PROBE_TEXTS, PROBE_TEXTS[1:] + PROBE_TEXTS[:1])]
        problem = "multi_label_classification" if self.config.multi_label else "single_label_classification"
        config = {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                  "label2id": {lab: i for i, lab in enumerate(self.labels)}, "problem_type": problem}
        if self.thresholds is not None:
            config["multitune_thresholds"] = dict(zip(self.labels if self.config.multi_label else self.labels[1:],
                                                      self.thresholds))
        return ExportSpec("sequence_classification", "text-classification", config, probes,
                          lambda model, head, batch: self.forward(model, head, batch).outputs["logits"])

    def state(self) -> dict:
        return {"labels": self.labels, "class_weights": self.weights, "thresholds": self.thresholds,
                "pair_input": self.pair_input, "head": self.head_layout, "main_metric": self.main_metric,
                "positive_label": None if self.positive is None else self.labels[self.positive]}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}
        self.weights = state.get("class_weights")
        self.thresholds = state.get("thresholds")
        self.pair_input = bool(state.get("pair_input", False))
        # a model saved before the layout was kept in the state: its config's choice (auto did not exist yet)
        self.head_layout = state.get("head") or (self.config.head if self.config.head != "auto" else "pooled")
        # a model saved before the main metric was selectable: its config's choice (the default, accuracy)
        self.main_metric = state.get("main_metric") or self.config.metric
        if self.main_metric not in MAIN_METRICS:
            raise ValueError(f"unknown main metric {shown(self.main_metric)} (expected one of: "
                             f"{', '.join(MAIN_METRICS)})")
        try:
            self.positive = positive_index(self.labels, state.get("positive_label") or self.config.positive_label,
                                           self.main_metric, f"tasks.{self.name}.", self.config.multi_label)
        except ConfigError as exc:  # restore_tasks names the model file
            raise ValueError(str(exc)) from None


def positive_index(labels: Sequence[str], configured: str | None, metric: str, prefix: str = "",
                   multi_label: bool = False) -> int | None:
    """The index of the positive class of a binary task, checking the ``positive_label`` and ``metric`` settings
    against the task's labels.

    Args:
        labels: the task's labels, in order.
        configured: ``positive_label`` (None: the second label, label id 1).
        metric: ``metric`` (the main metric); ``f1`` needs exactly two labels.
        prefix: the task's config path with a trailing dot (``tasks.<name>.``), for errors.
        multi_label: a multi-label task, which has no positive class.

    Returns:
        The positive label's index for a single-label task with two labels, else None.

    Raises:
        ConfigError: ``metric: f1`` or a ``positive_label`` on a task without exactly two labels, or a
            ``positive_label`` that is not one of them.
    """
    binary = len(labels) == 2 and not multi_label
    if metric == "f1" and not binary:
        raise ConfigError(prefix + "metric", f"f1 (F1 of the positive class) needs a binary task; this one has "
                                             f"{len(labels)} labels ({', '.join(labels)}); use macro_f1 or mcc")
    if configured is not None and configured not in labels:
        raise ConfigError(prefix + "positive_label", f"got {shown(configured)}; expected one of the task's "
                                                     f"labels: {', '.join(labels)}")
    if configured is not None and not binary:
        raise ConfigError(prefix + "positive_label", f"only for a binary task; this one has {len(labels)} labels "
                                                     f"({', '.join(labels)})")
    if not binary:
        return None
    return 1 if configured is None else list(labels).index(configured)


def matthews_correlation(gold: Sequence[int], pred: Sequence[int], n: int) -> float:
    """The Matthews correlation coefficient of single-label predictions, multi-class as Gorodkin (2004)
    generalises it (what scikit-learn's ``matthews_corrcoef`` computes); 0 when a side is constant.

    Computed from the class totals, not from a confusion matrix, so that a task with 10,000 labels costs no
    dense 10,000 x 10,000 table.

    Args:
        gold: gold class index per example.
        pred: predicted class index per example.
        n: the number of classes.

    Returns:
        The coefficient, in [-1, 1].
    """
    gold_arr, pred_arr = np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    s = float(len(gold_arr))
    correct = float(np.sum(gold_arr == pred_arr))
    t = np.bincount(gold_arr, minlength=n).astype(float)  # true count per class
    p = np.bincount(pred_arr, minlength=n).astype(float)  # predicted count per class
    cov_pp, cov_tt = s * s - p @ p, s * s - t @ t
    if cov_pp <= 0 or cov_tt <= 0:
        return 0.0
    return float((correct * s - p @ t) / np.sqrt(cov_pp * cov_tt))


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def best_threshold(scores: Sequence[float], gold: Sequence[bool], macro: bool) -> float:
    """The threshold t (predict positive iff score >= t) that maximises F1 of the positive class, or with
    ``macro`` the mean F1 of both classes. Candidates are the distinct scores (rounded to 6 digits, as
    :meth:`ClassificationTask.decode` rounds them) and 0.5; ties go to the candidate closest to 0.5.

    One sort and binary searches, so thousands of validation examples cost milliseconds.

    Args:
        scores: probability of the positive class per example.
        gold: whether each example is positive.
        macro: maximise the macro-F1 of positive and negative class instead of the positive F1.

    Returns:
        The threshold.
    """
    scores = np.round(np.asarray(scores, dtype=float), 6)
    gold = np.asarray(gold, dtype=bool)
    candidates = np.union1d(scores, [0.5])
    pos, neg = np.sort(scores[gold]), np.sort(scores[~gold])
    tp = len(pos) - np.searchsorted(pos, candidates, side="left")  # positives scoring >= t
    fp = len(neg) - np.searchsorted(neg, candidates, side="left")
    fn, tn = len(pos) - tp, len(neg) - fp
    f1 = _f1(tp, fp, fn)
    if macro:
        f1 = (f1 + _f1(tn, fn, fp)) / 2
    best = candidates[f1 >= f1.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - 0.5))])
