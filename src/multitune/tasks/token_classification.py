"""Token classification (NER and other BIO tagging) with entity-level seqeval metrics."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from torch import nn
from torch.nn import functional as F

from multitune.config.parse import field
from multitune.config.schema import TaskConfig
from multitune.errors import DataError
from multitune.tasks.base import (
    IGNORE_INDEX,
    PROBE_TEXTS,
    TASKS,
    ExportSpec,
    LinearHead,
    Task,
    TaskOutput,
    check_class_weights,
    class_weights,
    collate_inputs,
    label_sort_key,
    pad,
    where,
)

# Words and single punctuation marks, the way CoNLL-style corpora split raw text.
WORD_PATTERN = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


@dataclass
class TokenClassificationConfig(TaskConfig):
    dropout: float = field(0.1, help="dropout before the tagger", min=0.0, max=0.9)
    strict_bio: bool = field(True, help="reject I-X tags that do not follow B-X or I-X")
    class_weights: str | list[float] | None = field(None, help="'balanced' (inverse tag frequency over train "
                                                              "words) or one loss weight per tag, in label order")

    def validate(self, path: str) -> None:
        check_class_weights(self.class_weights, f"{path}.class_weights" if path else "class_weights")


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, first_word, last_word_exclusive)`` from BIO tags (a stray I-X opens a span)."""
    spans, start, kind = [], None, None
    for i, tag in enumerate([*tags, "O"]):
        if tag == "O" or tag.startswith("B-") or (tag.startswith("I-") and tag[2:] != kind):
            if start is not None:
                spans.append((kind, start, i))
            start, kind = (i, tag[2:]) if tag != "O" else (None, None)
    return spans


@TASKS.register("token_classification")
class TokenClassificationTask(Task):
    """Per-word BIO tags; each word's label sits on its first sub-token, the other sub-tokens are ignored.

    Metrics: entity-level ``precision``, ``recall``, ``f1`` (seqeval, exact span and type match).
    ``class_weights`` weight the cross-entropy per tag (``balanced``: inverse frequency of the training words'
    tags, counted per word, not per sub-token).
    """

    config_class = TokenClassificationConfig
    fields = ("tokens", "tags")
    required = ("tokens", "tags")
    main_metric = "f1"
    label_field = "tags"

    def __init__(self, name: str, config: TokenClassificationConfig):
        super().__init__(name, config)
        self.labels: list[str] = list(config.labels) if config.labels else []
        self.weights: list[float] | None = None

    def setup(self, train_examples: Sequence[dict]) -> None:
        if not self.labels:
            kinds = {t[2:] for ex in train_examples for t in ex["tags"] if t != "O"}
            self.labels = ["O"] + sorted({f"{p}-{k}" for k in kinds for p in "BI"}, key=label_sort_key)
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}
        self.weights = None
        if self.config.class_weights is not None:
            self.check_examples(train_examples)
            counts = [0] * len(self.labels)
            for ex in train_examples:
                for tag in ex["tags"]:
                    counts[self.label_index[tag]] += 1
            self.weights = class_weights(self.config.class_weights, counts, self.labels,
                                         f"tasks.{self.name}.class_weights")

    def check_examples(self, examples: Sequence[dict]) -> None:
        for ex in examples:
            file, line = where(ex)
            if len(ex["tokens"]) != len(ex["tags"]):
                raise DataError(file, f"{len(ex['tokens'])} tokens but {len(ex['tags'])} tags", line)
            prev = "O"
            for i, tag in enumerate(ex["tags"]):
                at = line + i if isinstance(line, int) else line
                if tag != "O" and not re.fullmatch(r"[BI]-\S+", tag):
                    raise DataError(file, f"tag {tag!r} is not BIO (expected O, B-TYPE or I-TYPE)", at)
                if tag not in self.label_index:
                    raise DataError(file, f"tag {tag!r} is not in the label set of task {self.name!r}", at)
                if self.config.strict_bio and tag.startswith("I-") and prev[2:] != tag[2:]:
                    raise DataError(file, f"tag {tag!r} follows {prev!r}; expected B-{tag[2:]} or I-{tag[2:]} "
                                          f"before it (set strict_bio: false to accept)", at)
                prev = tag

    def example_from_input(self, item: Any) -> dict:
        if isinstance(item, dict) and "tokens" in item:
            return dict(item)
        text = item["text"] if isinstance(item, dict) else str(item)
        matches = list(WORD_PATTERN.finditer(text))
        return {"text": text, "tokens": [m.group() for m in matches],
                "offsets": [(m.start(), m.end()) for m in matches]}

    def encode(self, examples: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict]:
        enc = tokenizer([list(ex["tokens"]) for ex in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length, padding=False)
        feats = []
        for i, ex in enumerate(examples):
            word_ids = enc.word_ids(i)
            first = [w if w is not None and (j == 0 or word_ids[j - 1] != w) else -1
                     for j, w in enumerate(word_ids)]
            feat = {"input_ids": enc["input_ids"][i], "word_index": first}
            if "token_type_ids" in enc:
                feat["token_type_ids"] = enc["token_type_ids"][i]
            if ex.get("tags") is not None:
                feat["labels"] = [self.label_index[ex["tags"][w]] if w >= 0 else IGNORE_INDEX for w in first]
            feats.append(feat)
        return feats

    def collate(self, features, pad_token_id, generator=None):
        batch = collate_inputs(features, pad_token_id)
        batch["word_index"] = pad([f["word_index"] for f in features], -1)
        if "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX)
        return batch

    def build_head(self, hidden_size: int) -> nn.Module:
        return LinearHead(hidden_size, len(self.labels), self.config.dropout)

    def forward(self, model, head, batch) -> TaskOutput:
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        logits = head(hidden).float()
        loss = None
        if "labels" in batch:
            weight = None if self.weights is None else torch.tensor(self.weights, device=logits.device)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), batch["labels"].view(-1), weight=weight,
                                   ignore_index=IGNORE_INDEX)
        return TaskOutput(loss, {"logits": logits})

    def decode(self, output, batch, examples) -> list[dict]:
        probs = torch.softmax(output.outputs["logits"], dim=-1)
        best_p, best = probs.max(dim=-1)
        preds = []
        for row, ex in enumerate(examples):
            n_words = len(ex["tokens"])
            tags, scores = ["O"] * n_words, [1.0] * n_words  # words cut off by truncation stay O
            for pos, w in enumerate(batch["word_index"][row].tolist()):
                if w >= 0:
                    tags[w] = self.labels[best[row, pos]]
                    scores[w] = float(best_p[row, pos])
            entities = []
            for kind, start, end in bio_spans(tags):
                ent = {"type": kind, "text": " ".join(ex["tokens"][start:end]), "start_token": start,
                       "end_token": end, "score": round(min(scores[start:end]), 6)}
                if ex.get("offsets"):
                    ent["start"], ent["end"] = ex["offsets"][start][0], ex["offsets"][end - 1][1]
                    ent["text"] = ex["text"][ent["start"]:ent["end"]]
                entities.append(ent)
            preds.append({"tags": tags, "entities": entities})
        return preds

    def compute_metrics(self, predictions, examples) -> dict[str, float]:
        gold = [list(ex["tags"]) for ex in examples]
        pred = [p["tags"] for p in predictions]
        return {"precision": float(precision_score(gold, pred, zero_division=0)),
                "recall": float(recall_score(gold, pred, zero_division=0)),
                "f1": float(f1_score(gold, pred, zero_division=0))}

    def export_spec(self) -> ExportSpec:
        """``AutoModelForTokenClassification``: per sub-token ``logits``; a word's tag is its first sub-token's,
        which ``pipeline("token-classification", aggregation_strategy="first")`` reproduces."""
        config = {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                  "label2id": {lab: i for i, lab in enumerate(self.labels)}}
        return ExportSpec("token_classification", "token-classification", config, list(PROBE_TEXTS),
                          lambda model, head, batch: self.forward(model, head, batch).outputs["logits"])

    def state(self) -> dict:
        return {"labels": self.labels, "class_weights": self.weights}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}
        self.weights = state.get("class_weights")
