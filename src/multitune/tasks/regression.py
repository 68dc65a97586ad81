"""Regression on single texts or pairs: cross-encoder (pair in one input) or bi-encoder (cosine)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.nn import functional as F

from multitune.config.parse import field
from multitune.config.schema import TaskConfig
from multitune.errors import ConfigError, DataError
from multitune.tasks.base import (
    PROBE_TEXTS,
    SENTENCE_HEADS,
    TASKS,
    ExportSpec,
    PoolerHead,
    Task,
    TaskOutput,
    collate_inputs,
    parse_float,
    resolve_sentence_head,
    tokenize_texts,
    warm_start_pooler,
    where,
)


@dataclass
class RegressionConfig(TaskConfig):
    encoder: str = field("cross", help="cross: the pair is one input; bi: cosine of the two pooled embeddings",
                         choices=["cross", "bi"])
    label_range: list[float] | None = field(None, help="[low, high] of the scores; scores outside are errors "
                                                       "and predictions are kept inside")
    head: str = field("pooled", help="cross-encoder: pooled (the pooled sentence embedding -> linear), pooler "
                                     "(first token -> dense from the backbone's pooler -> tanh -> linear, BERT's "
                                     "layout, which exports as the stock AutoModelForSequenceClassification) or "
                                     "auto (pooler on encoder backbones, pooled on the others)",
                      choices=list(SENTENCE_HEADS))
    dropout: float = field(0.1, help="dropout before the regressor (cross-encoder)", min=0.0, max=0.9)

    def validate(self, path: str) -> None:
        if self.label_range is not None and (len(self.label_range) != 2 or
                                             self.label_range[0] >= self.label_range[1]):
            raise ConfigError(f"{path}.label_range", f"expected [low, high] with low < high, "
                                                     f"got {self.label_range}")
        if self.encoder == "bi" and self.label_range is None:
            raise ConfigError(f"{path}.label_range", "required with encoder: bi (cosine is mapped onto it)")
        if self.encoder == "bi" and self.head == "pooler":
            raise ConfigError(f"{path}.head", "a bi-encoder has no head (it scores the cosine of two sentence "
                                              "embeddings); head: pooler needs encoder: cross")


class RegressionHead(nn.Module):
    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.regressor = nn.Linear(hidden_size, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.regressor(self.dropout(pooled)).squeeze(-1)


@TASKS.register("regression")
class RegressionTask(Task):
    """Scores for texts or pairs (e.g. semantic similarity 0-5).

    With ``label_range`` the model predicts on a 0-1 scale (sigmoid for the cross-encoder, cosine
    mapped from [-1, 1] for the bi-encoder) that is mapped back onto the range. Without it the
    cross-encoder predicts raw values. Metrics: ``pearson``, ``spearman``, ``mse`` (on the original scale).
    """

    config_class = RegressionConfig
    fields = ("text", "text_pair", "label")
    required = ("text", "label")
    main_metric = "pearson"
    lower_is_better = frozenset({"loss", "mse"})

    def __init__(self, name: str, config: RegressionConfig):
        super().__init__(name, config)
        self.head_layout: str | None = None  # config.head resolved on the backbone (bind), or a saved model's

    def bind(self, architecture, tokenizer) -> None:
        super().bind(architecture, tokenizer)
        if self.head_layout is None:
            self.head_layout = resolve_sentence_head(self.config.head, architecture)

    def setup(self, train_examples: Sequence[dict]) -> None:
        self.pair_input = self.config.encoder == "bi" or any(ex.get("text_pair") for ex in train_examples)

    def state(self) -> dict:
        return {"pair_input": self.pair_input, "head": self.head_layout}

    def load_state(self, state: dict) -> None:
        self.pair_input = bool(state.get("pair_input", self.config.encoder == "bi"))
        # a model saved before the layout was kept in the state: its config's choice (auto did not exist yet)
        self.head_layout = state.get("head") or (self.config.head if self.config.head != "auto" else "pooled")

    def export_spec(self) -> ExportSpec:
        """A cross-encoder exports as ``AutoModelForSequenceClassification`` with one output
        (``problem_type: regression``); its ``logits`` are the head's raw output: with ``label_range`` the score is
        ``low + (high - low) * sigmoid(logit)`` (recorded as ``multitune_label_range`` in ``config.json``).
        A bi-encoder exports as its backbone with the sentence-transformers layout (cosine of embeddings)."""
        pairs = [(a, b) for a, b in zip(PROBE_TEXTS, PROBE_TEXTS[1:] + PROBE_TEXTS[:1])]
        config = {"multitune_label_range": self.config.label_range}
        if self.config.encoder == "bi":
            return ExportSpec("sentence_embedding", "sentence-similarity", config, pairs)

        def logits(model, head, batch):
            hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            if isinstance(head, PoolerHead):
                return head(hidden).float()
            return head.regressor(model.pool(hidden, batch["attention_mask"])).float()

        config.update({"num_labels": 1, "id2label": {0: self.name}, "label2id": {self.name: 0},
                       "problem_type": "regression"})
        return ExportSpec("sequence_classification", "text-classification", config,
                          pairs if self.pair_input else list(PROBE_TEXTS), logits)

    def check_examples(self, examples: Sequence[dict]) -> None:
        rng = self.config.label_range
        for ex in examples:
            if ex.get("label") is None:
                continue
            value = parse_float(ex, "label")
            if rng is not None and not rng[0] <= value <= rng[1]:
                file, line = where(ex)
                raise DataError(file, f"score {value} is outside label_range [{rng[0]}, {rng[1]}]", line)
            if self.config.encoder == "bi" and not ex.get("text_pair"):
                file, line = where(ex)
                raise DataError(file, "encoder: bi needs a text_pair in every example", line)

    def _scale(self, value: float) -> float:
        rng = self.config.label_range
        return (value - rng[0]) / (rng[1] - rng[0]) if rng else value

    def _unscale(self, value: torch.Tensor) -> torch.Tensor:
        rng = self.config.label_range
        return value * (rng[1] - rng[0]) + rng[0] if rng else value

    def encode(self, examples: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict]:
        texts = [ex["text"] for ex in examples]
        if self.config.encoder == "bi":
            feats = tokenize_texts(tokenizer, texts, None, max_length)
            seconds = tokenize_texts(tokenizer, [ex["text_pair"] for ex in examples], None, max_length)
            for f, s in zip(feats, seconds):
                f.update({f"pair_{k}": v for k, v in s.items()})
        else:
            has_pair = any(ex.get("text_pair") for ex in examples)
            pairs = [ex.get("text_pair") or "" for ex in examples] if has_pair else None
            feats = tokenize_texts(tokenizer, texts, pairs, max_length)
        for f, ex in zip(feats, examples):
            if ex.get("label") is not None:
                f["labels"] = self._scale(parse_float(ex, "label"))
        return feats

    def collate(self, features, pad_token_id, generator=None):
        batch = collate_inputs(features, pad_token_id)
        if self.config.encoder == "bi":
            batch.update(collate_inputs(features, pad_token_id, prefix="pair_"))
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.float32)
        return batch

    def build_head(self, hidden_size: int) -> nn.Module:
        # The bi-encoder scores with a cosine and has no parameters of its own.
        if self.config.encoder == "bi":
            return nn.Identity()
        if self.head_layout == "pooler":
            return PoolerHead(hidden_size, 1, self.config.dropout)
        return RegressionHead(hidden_size, self.config.dropout)

    def warm_start_head(self, head: nn.Module, backbone: nn.Module) -> None:
        warm_start_pooler(head, backbone)

    def forward(self, model, head, batch) -> TaskOutput:
        if self.config.encoder == "bi":
            first = model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            second = model.embed(batch["pair_input_ids"], batch["pair_attention_mask"],
                                 batch.get("pair_token_type_ids"))
            pred = (F.cosine_similarity(first.float(), second.float(), dim=-1) + 1) / 2
        else:
            hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            if isinstance(head, PoolerHead):
                pred = head(hidden).squeeze(-1).float()
            else:
                pred = head(model.pool(hidden, batch["attention_mask"])).float()
            if self.config.label_range is not None:
                pred = torch.sigmoid(pred)
        loss = F.mse_loss(pred, batch["labels"]) if "labels" in batch else None
        return TaskOutput(loss, {"scores": pred})

    def decode(self, output, batch, examples) -> list[dict]:
        scores = self._unscale(output.outputs["scores"].detach())
        return [{"score": round(float(s), 6)} for s in scores]

    def compute_metrics(self, predictions, examples) -> dict[str, float]:
        pred = np.array([p["score"] for p in predictions], dtype=float)
        gold = np.array([float(ex["label"]) for ex in examples], dtype=float)
        if len(gold) < 2 or np.std(pred) == 0 or np.std(gold) == 0:
            pearson = spearman = 0.0  # undefined for constant predictions: count as no correlation
        else:
            pearson, spearman = float(pearsonr(pred, gold)[0]), float(spearmanr(pred, gold)[0])
        return {"pearson": pearson, "spearman": spearman, "mse": float(np.mean((pred - gold) ** 2))}
