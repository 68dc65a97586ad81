"""Sentence and sentence-pair classification, single-label or multi-label."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn import functional as F

from multitune.config.parse import field
from multitune.config.schema import TaskConfig
from multitune.errors import DataError
from multitune.tasks.base import (
    TASKS,
    LinearHead,
    Task,
    TaskOutput,
    collate_inputs,
    label_sort_key,
    tokenize_texts,
    where,
)


@dataclass
class ClassificationConfig(TaskConfig):
    multi_label: bool = field(False, help="each example may carry several labels (sigmoid + BCE)")
    label_separator: str = field(",", help="multi-label: separator of labels inside one text field")
    dropout: float = field(0.1, help="dropout before the classifier", min=0.0, max=0.9)
    threshold: float = field(0.5, help="multi-label: probability above which a label is predicted",
                             gt=0.0, max=1.0)


@TASKS.register("classification")
class ClassificationTask(Task):
    """Pooled sentence (or pair) embedding -> linear classifier.

    Metrics: ``accuracy`` (subset accuracy for multi-label), ``macro_f1``, and ``micro_f1`` for multi-label.
    """

    config_class = ClassificationConfig
    fields = ("text", "text_pair", "label")
    required = ("text", "label")
    stratify_key = "label"
    main_metric = "accuracy"

    def __init__(self, name: str, config: ClassificationConfig):
        super().__init__(name, config)
        self.labels: list[str] = list(config.labels) if config.labels else []

    # -- labels ----------------------------------------------------------------------
    def _example_labels(self, example: dict) -> list[str]:
        raw = example.get("label")
        if self.config.multi_label:
            if isinstance(raw, (list, tuple)):
                return [str(v).strip() for v in raw]
            return [p.strip() for p in str(raw).split(self.config.label_separator) if p.strip()]
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        return [str(raw).strip()]

    def setup(self, train_examples: Sequence[dict]) -> None:
        if not self.labels:
            found = {lab for ex in train_examples for lab in self._example_labels(ex)}
            self.labels = sorted(found, key=label_sort_key)
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}

    def check_examples(self, examples: Sequence[dict]) -> None:
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
        return LinearHead(hidden_size, len(self.labels), self.config.dropout)

    def forward(self, model, head, batch) -> TaskOutput:
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        logits = head(model.pool(hidden, batch["attention_mask"])).float()
        loss = None
        if "labels" in batch:
            if self.config.multi_label:
                loss = F.binary_cross_entropy_with_logits(logits, batch["labels"])
            else:
                loss = F.cross_entropy(logits, batch["labels"])
        return TaskOutput(loss, {"logits": logits})

    # -- results ---------------------------------------------------------------------
    def decode(self, output, batch, examples) -> list[dict]:
        logits = output.outputs["logits"]
        probs = torch.sigmoid(logits) if self.config.multi_label else torch.softmax(logits, dim=-1)
        preds = []
        for row in probs.tolist():
            scores = {lab: round(p, 6) for lab, p in zip(self.labels, row)}
            if self.config.multi_label:
                chosen = [lab for lab, p in scores.items() if p >= self.config.threshold]
                preds.append({"labels": chosen, "scores": scores})
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
            return {"accuracy": float(accuracy_score(gold, pred)),
                    "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
                    "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0))}
        gold = [self.label_index[self._example_labels(ex)[0]] for ex in examples]
        pred = [self.label_index[p["label"]] for p in predictions]
        return {"accuracy": float(accuracy_score(gold, pred)),
                "macro_f1": float(f1_score(gold, pred, average="macro", labels=list(range(n)), zero_division=0))}

    def state(self) -> dict:
        return {"labels": self.labels}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}
