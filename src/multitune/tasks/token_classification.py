"""Token classification (NER and other BIO tagging) with entity-level (conlleval / seqeval) metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from multitune.config.parse import field
from multitune.config.schema import TaskConfig
from multitune.errors import DataError
from multitune.tasks import metrics as task_metrics
from multitune.tasks.base import (
    IGNORE_INDEX,
    NEW_HEAD_LEARNING_RATE,
    PROBE_TEXTS,
    TASKS,
    EncoderCall,
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
#: consecutive windows over a long input share 1/WINDOW_OVERLAP of a window's sub-tokens
WINDOW_OVERLAP = 4


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


def window_spans(length: int, size: int) -> list[tuple[int, int]]:
    """Overlapping ``[start, end)`` windows of at most ``size`` sub-tokens over ``length`` sub-tokens, as the
    transformers token-classification pipeline strides over a long input: consecutive windows share a
    quarter of ``size`` (:data:`WINDOW_OVERLAP`), and the last one ends at ``length`` (a full window). An
    input that fits is one window."""
    if length <= size:
        return [(0, length)]
    step = max(1, size - size // WINDOW_OVERLAP)
    return [(start, start + size) for start in [*range(0, length - size, step), length - size]]


def window_owners(spans: Sequence[tuple[int, int]], length: int) -> list[int]:
    """For each sub-token position, the window that predicts it: of the windows holding it, the one where
    it is farthest from a cut (a window edge inside the input; the input's own start and end are no cut),
    so that it sees the most context on both sides; ties go to the earlier window."""
    owner = [0] * length
    best = [-1.0] * length
    for k, (start, end) in enumerate(spans):
        for pos in range(start, end):
            room = min(pos - start if start > 0 else math.inf, end - 1 - pos if end < length else math.inf)
            if room > best[pos]:
                owner[pos], best[pos] = k, room
    return owner


def first_rows(window_of: torch.Tensor) -> torch.Tensor:
    """The rows of a windowed batch that are an example's first window (``window_of``: example per row)."""
    return torch.cat([window_of.new_ones(1, dtype=torch.bool), window_of[1:] != window_of[:-1]])


def _first_windows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch of each example's first window (a batch without extra windows as it is)."""
    if "window_of" not in batch:
        return batch
    first = first_rows(batch["window_of"])
    return {k: v if k == "labels" else v[first] for k, v in batch.items() if k != "window_of"}


@TASKS.register("token_classification")
class TokenClassificationTask(Task):
    """Per-word BIO tags; each word's label sits on its first sub-token, the other sub-tokens are ignored.

    Metrics: entity-level ``precision``, ``recall``, ``f1`` (exact span and type match, the numbers
    of seqeval and conlleval; see :func:`multitune.tasks.metrics.entity_scores`).
    ``class_weights`` weight the cross-entropy per tag (``balanced``: inverse frequency of the training words'
    tags, counted per word, not per sub-token).

    Long inputs: an example longer than ``max_length`` sub-tokens is cut into overlapping windows
    (:func:`window_spans`); prediction and evaluation run every window and take each word's tag from the window
    where the word is farthest from a cut (:func:`window_owners`), so every word is tagged and scored. Training
    sees each example's first window only, as truncation gives it.
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
        """One feature per example. An example longer than ``max_length`` tokens is cut into overlapping
        windows (see :func:`window_spans`): the feature's own ``input_ids`` and ``labels`` are the first
        window, exactly what truncation gives (training sees that); ``windows`` holds the others, which
        :meth:`collate` adds as rows of their own so that prediction and evaluation tag every word."""
        # verbose=False: no "sequence longer than the model's maximum" notice, the windows take care of it
        enc = tokenizer([list(ex["tokens"]) for ex in examples], is_split_into_words=True, truncation=False,
                        padding=False, verbose=False)
        feats = []
        for i, ex in enumerate(examples):
            ids, word_ids = enc["input_ids"][i], enc.word_ids(i)
            types = enc["token_type_ids"][i] if "token_type_ids" in enc else None
            first = [w if w is not None and (j == 0 or word_ids[j - 1] != w) else -1
                     for j, w in enumerate(word_ids)]
            head = next((j for j, w in enumerate(word_ids) if w is not None), len(ids))  # leading special tokens
            tail = next((j for j, w in enumerate(reversed(word_ids)) if w is not None), 0)  # trailing ones
            content = len(ids) - head - tail
            spans = window_spans(content, max(1, max_length - head - tail))
            owner = window_owners(spans, content)
            rows = []
            for k, (start, end) in enumerate(spans):
                keep = [*range(head), *range(head + start, head + end), *range(len(ids) - tail, len(ids))]
                # the words this window predicts: those whose first piece is farthest from a cut here
                row = {"input_ids": [ids[j] for j in keep],
                       "word_index": [first[j] if first[j] >= 0 and owner[j - head] == k else -1 for j in keep]}
                if types is not None:
                    row["token_type_ids"] = [types[j] for j in keep]
                rows.append((keep, row))
            keep, feat = rows[0]
            if ex.get("tags") is not None:  # on every word of the first window, as truncation would give
                feat["labels"] = [self.label_index[ex["tags"][first[j]]] if first[j] >= 0 else IGNORE_INDEX
                                  for j in keep]
            if len(rows) > 1:
                feat["windows"] = [row for _, row in rows[1:]]
            feats.append(feat)
        return feats

    def training_features(self, features: list[dict]) -> list[dict]:
        """Without the extra windows of long examples: training sees each example's first window."""
        return [{k: v for k, v in f.items() if k != "windows"} if "windows" in f else f for f in features]

    def collate(self, features, pad_token_id, generator=None):
        """Pad the features into one batch. A feature with ``windows`` gives one row per window, in order;
        ``window_of`` (only present then) names the feature of each row. ``labels`` has one row per feature
        (its first window), as wide as the batch."""
        rows = [w for f in features for w in (f, *f.get("windows", ()))]
        batch = collate_inputs(rows, pad_token_id)
        batch["word_index"] = pad([r["word_index"] for r in rows], -1)
        if "labels" in features[0]:
            labels = torch.full((len(features), batch["input_ids"].shape[1]), IGNORE_INDEX, dtype=torch.long)
            for i, f in enumerate(features):
                labels[i, :len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
            batch["labels"] = labels
        if len(rows) > len(features):
            batch["window_of"] = torch.tensor([i for i, f in enumerate(features)
                                               for _ in range(1 + len(f.get("windows", ())))])
        return batch

    def new_head_learning_rate(self) -> float | None:
        return NEW_HEAD_LEARNING_RATE

    def build_head(self, hidden_size: int) -> nn.Module:
        return LinearHead(hidden_size, len(self.labels), self.config.dropout)

    def forward(self, model, head, batch) -> TaskOutput:
        """The training pass: each example's first window only (a long example trains as if truncated)."""
        return self.infer(model, head, _first_windows(batch))

    def encoder_inputs(self, batch) -> list[EncoderCall]:
        batch = _first_windows(batch)
        return [(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))]

    def infer(self, model, head, batch) -> TaskOutput:
        """Logits of every row of the batch (every window of a long example); the loss, when the batch has
        labels, is over each example's first window, as in training."""
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        logits = head(hidden).float()
        loss = None
        if "labels" in batch:
            scored = logits[first_rows(batch["window_of"])] if "window_of" in batch else logits
            weight = None if self.weights is None else torch.tensor(self.weights, device=logits.device)
            loss = F.cross_entropy(scored.reshape(-1, scored.size(-1)), batch["labels"].view(-1), weight=weight,
                                   ignore_index=IGNORE_INDEX)
        return TaskOutput(loss, {"logits": logits})

    def length_strata(self, features: Sequence[dict]) -> list[int] | None:
        """Sentences with and without an entity (long sentences hold more entities), so that length-grouped
        batches keep both."""
        outside = self.label_index.get("O")
        if not features or "labels" not in features[0]:
            return None
        return [int(any(t not in (IGNORE_INDEX, outside) for t in f["labels"])) for f in features]

    def decode(self, output, batch, examples) -> list[dict]:
        """Tokens (the words the text was split into), their tags, and entities (with character ``start``/``end``
        offsets into the text when it was given as a text) per example. Each word takes its tag from the one row
        (window) whose ``word_index`` holds it; a word with no sub-token (e.g. a lone control character) stays
        ``O``."""
        probs = torch.softmax(output.outputs["logits"], dim=-1)
        best_p, best = (t.tolist() for t in probs.max(dim=-1))
        owner = batch["window_of"].tolist() if "window_of" in batch else list(range(len(examples)))
        tags = [["O"] * len(ex["tokens"]) for ex in examples]
        scores = [[1.0] * len(ex["tokens"]) for ex in examples]
        for row, (i, words) in enumerate(zip(owner, batch["word_index"].tolist())):
            for pos, w in enumerate(words):
                if w >= 0:
                    tags[i][w] = self.labels[best[row][pos]]
                    scores[i][w] = float(best_p[row][pos])
        preds = []
        for ex, ex_tags, ex_scores in zip(examples, tags, scores):
            entities = []
            for kind, start, end in bio_spans(ex_tags):
                ent = {"type": kind, "text": " ".join(ex["tokens"][start:end]), "start_token": start,
                       "end_token": end, "score": round(min(ex_scores[start:end]), 6)}
                if ex.get("offsets"):
                    ent["start"], ent["end"] = ex["offsets"][start][0], ex["offsets"][end - 1][1]
                    ent["text"] = ex["text"][ent["start"]:ent["end"]]
                entities.append(ent)
            preds.append({"tokens": list(ex["tokens"]), "tags": ex_tags, "entities": entities})
        return preds

    def compute_metrics(self, predictions, examples) -> dict[str, float]:
        gold = [list(ex["tags"]) for ex in examples]
        pred = [p["tags"] for p in predictions]
        precision, recall, f1 = task_metrics.entity_scores(gold, pred)
        return {"precision": precision, "recall": recall, "f1": f1}

    def export_spec(self) -> ExportSpec:
        """``AutoModelForTokenClassification``: per sub-token ``logits``; a word's tag is its first sub-token's,
        which ``pipeline("token-classification", aggregation_strategy="first")`` reproduces."""
        config = {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                  "label2id": {lab: i for i, lab in enumerate(self.labels)}}
        return ExportSpec("token_classification", "token-classification", config, list(PROBE_TEXTS),
                          lambda model, head, batch: self.infer(model, head, batch).outputs["logits"])

    def state(self) -> dict:
        return {"labels": self.labels, "class_weights": self.weights}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}
        self.weights = state.get("class_weights")
