"""Regression on single texts or pairs: cross-encoder (pair in one input) or bi-encoder (cosine)."""

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
from multitune.errors import ConfigError, DataError
from multitune.tasks import metrics as task_metrics
from multitune.tasks.base import (
    NEW_HEAD_LEARNING_RATE,
    PROBE_TEXTS,
    SENTENCE_HEADS,
    TASKS,
    EncoderCall,
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

#: the training objectives (``objective``); cosent ranks cosines, so it needs the bi-encoder
OBJECTIVES = ("mse", "cosent")
#: the bi-encoder's score on the 0-1 scale of ``label_range``, from the cosine of the two sentence embeddings, as
#: kept in the task's saved state (``score``). A sentence-embedding backbone puts unrelated sentences near cosine
#: 0, not -1, so the cosine itself is the score (as sentence-transformers' CosineSimilarityLoss fits it), kept
#: inside the range; models saved before the state named it scored (cosine + 1) / 2 and keep doing so.
BI_SCORE, LEGACY_BI_SCORE = "max(cosine, 0)", "(cosine + 1) / 2"
BI_SCORES = (BI_SCORE, LEGACY_BI_SCORE)
#: CoSENT's scale: the inverse temperature of its cosine differences (20, as in Su 2022 and sentence-transformers)
COSENT_SCALE = 20.0


def cosent_loss(cosine: torch.Tensor, labels: torch.Tensor, scale: float = COSENT_SCALE) -> torch.Tensor:
    """CoSENT: ``log(1 + sum over pairs (i, j) with labels[i] > labels[j] of exp(scale * (cos_j - cos_i)))``.

    Every pair of rows whose gold scores are ordered is penalised when their cosines are ordered the other
    way (or too close), so the loss asks for the gold *order* only, never for a particular cosine: a
    backbone trained for cosine similarity keeps its geometry, and the loss does not change under any
    increasing map of the gold scores.

    Args:
        cosine: [batch] cosine similarities of the pairs.
        labels: [batch] gold scores (any increasing scale).
        scale: inverse temperature of the cosine differences.

    Returns:
        The scalar loss; 0 (with a zero gradient) when no two gold scores differ.

    Reference:
        Su, "CoSENT: a more efficient sentence vector scheme than Sentence-BERT" (2022),
        https://kexue.fm/archives/8847; ``CoSENTLoss`` in sentence-transformers.

    Example:
        >>> cosent_loss(torch.tensor([0.5, 0.6]), torch.tensor([5.0, 1.0]))  # log(1 + exp(20 * (0.6 - 0.5)))
        tensor(2.1269)
    """
    cosine, labels = cosine.float(), labels.float()
    diff = scale * (cosine[None, :] - cosine[:, None])  # [i, j]: scale * (cos_j - cos_i)
    diff = diff.masked_fill(~(labels[:, None] > labels[None, :]), float("-inf"))
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)


def bi_encoder_score(state: dict) -> str:
    """The score formula of a saved bi-encoder (its task ``state``), in terms of ``cosine``, on the 0-1 scale of
    its ``label_range``: one of :data:`BI_SCORES`.

    Raises:
        ValueError: a formula this version does not compute (a model saved by a newer multitune).
    """
    score = state.get("score", LEGACY_BI_SCORE)
    if score not in BI_SCORES:
        raise ValueError(f"score {score!r} is not one this multitune computes ({', '.join(BI_SCORES)}); "
                         f"upgrade multitune")
    return score


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
    objective: str = field("mse", help="training objective: mse (squared error against the gold score scaled to "
                                       "0-1, of the sigmoid output for the cross-encoder, of the cosine for the "
                                       "bi-encoder) or, bi-encoder only, cosent (CoSENT: ranks each batch's "
                                       "pairs by cosine in the order of their gold scores)", choices=list(OBJECTIVES))

    def validate(self, path: str) -> None:
        if self.label_range is not None and (len(self.label_range) != 2 or
                                             self.label_range[0] >= self.label_range[1]):
            raise ConfigError(f"{path}.label_range", f"expected [low, high] with low < high, "
                                                     f"got {self.label_range}")
        if self.encoder == "bi" and self.label_range is None:
            raise ConfigError(f"{path}.label_range", "required with encoder: bi (cosine is mapped onto it)")
        if self.encoder == "cross" and self.objective == "cosent":
            raise ConfigError(f"{path}.objective", "cosent ranks the cosines of a bi-encoder; the cross-encoder "
                                                   "trains with mse (leave objective out, or set encoder: bi)")
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

    With ``label_range`` the model predicts on a 0-1 scale (sigmoid for the cross-encoder, the cosine of
    the two sentence embeddings, below 0 taken as 0, for the bi-encoder) that is mapped back onto the range.
    Without it the cross-encoder predicts raw values. Metrics: ``pearson``, ``spearman``, ``mse`` (on the
    original scale).

    The cross-encoder trains with the squared error on the 0-1 scale. The bi-encoder has no parameters of its
    own, so before any step it scores exactly as its backbone's cosine; it trains with ``objective``: ``mse``
    (the default: squared error of the cosine against the score on the 0-1 scale, as sentence-transformers'
    ``CosineSimilarityLoss``) or ``cosent`` (:func:`cosent_loss`).
    """

    config_class = RegressionConfig
    fields = ("text", "text_pair", "label")
    required = ("text", "label")
    main_metric = "pearson"
    lower_is_better = frozenset({"loss", "mse"})

    def __init__(self, name: str, config: RegressionConfig):
        super().__init__(name, config)
        self.head_layout: str | None = None  # config.head resolved on the backbone (bind), or a saved model's
        self.bi_score = BI_SCORE  # the score this version trains; a saved model's own comes from load_state

    def bind(self, architecture, tokenizer) -> None:
        super().bind(architecture, tokenizer)
        if self.head_layout is None:
            self.head_layout = resolve_sentence_head(self.config.head, architecture)

    def setup(self, train_examples: Sequence[dict]) -> None:
        self.pair_input = self.config.encoder == "bi" or any(ex.get("text_pair") for ex in train_examples)

    def state(self) -> dict:
        state = {"pair_input": self.pair_input, "head": self.head_layout}
        return {**state, "score": self.bi_score} if self.config.encoder == "bi" else state

    def load_state(self, state: dict) -> None:
        self.pair_input = bool(state.get("pair_input", self.config.encoder == "bi"))
        # a model saved before the layout was kept in the state: its config's choice (auto did not exist yet)
        self.head_layout = state.get("head") or (self.config.head if self.config.head != "auto" else "pooled")
        self.bi_score = bi_encoder_score(state) if self.config.encoder == "bi" else BI_SCORE

    def export_spec(self) -> ExportSpec:
        """A cross-encoder exports as ``AutoModelForSequenceClassification`` with one output
        (``problem_type: regression``); its ``logits`` are the head's raw output: with ``label_range`` the score is
        ``low + (high - low) * sigmoid(logit)`` (recorded as ``multitune_label_range`` in ``config.json``).
        A bi-encoder exports as its backbone with the sentence-transformers layout; its score,
        ``low + (high - low) * max(cosine, 0)`` of the two embeddings, is recorded as ``multitune_score``."""
        pairs = [(a, b) for a, b in zip(PROBE_TEXTS, PROBE_TEXTS[1:] + PROBE_TEXTS[:1])]
        config = {"multitune_label_range": self.config.label_range}
        if self.config.encoder == "bi":
            config["multitune_score"] = f"low + (high - low) * {self.bi_score}"
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

    def new_head_learning_rate(self) -> float | None:
        # measured for the cross-encoder's linear head (the bi-encoder has no head parameters)
        return None if self.head_layout == "pooler" else NEW_HEAD_LEARNING_RATE

    def warm_start_head(self, head: nn.Module, backbone: nn.Module) -> None:
        warm_start_pooler(head, backbone)

    def forward(self, model, head, batch) -> TaskOutput:
        if self.config.encoder == "bi":
            first = model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            second = model.embed(batch["pair_input_ids"], batch["pair_attention_mask"],
                                 batch.get("pair_token_type_ids"))
            cosine = F.cosine_similarity(first.float(), second.float(), dim=-1)
            if self.bi_score == LEGACY_BI_SCORE:
                fitted = pred = (cosine + 1) / 2
            else:  # mse fits the cosine itself, so that a pair below cosine 0 still learns; the score stays in range
                fitted, pred = cosine, cosine.clamp(min=0)
            if "labels" not in batch:
                return TaskOutput(None, {"scores": pred})
            loss = (cosent_loss(cosine, batch["labels"]) if self.config.objective == "cosent" else
                    F.mse_loss(fitted, batch["labels"]))
            return TaskOutput(loss, {"scores": pred})
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

    def encoder_inputs(self, batch) -> list[EncoderCall]:
        calls = [(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))]
        if self.config.encoder == "bi":  # forward embeds the second texts after the first
            calls.append((batch["pair_input_ids"], batch["pair_attention_mask"], batch.get("pair_token_type_ids")))
        return calls

    def decode(self, output, batch, examples) -> list[dict]:
        scores = self._unscale(output.outputs["scores"].detach())
        return [{"score": round(float(s), 6)} for s in scores]

    def compute_metrics(self, predictions, examples) -> dict[str, float]:
        pred = np.array([p["score"] for p in predictions], dtype=float)
        gold = np.array([float(ex["label"]) for ex in examples], dtype=float)
        if len(gold) < 2 or np.std(pred) == 0 or np.std(gold) == 0:
            pearson = spearman = 0.0  # undefined for constant predictions: count as no correlation
        else:
            pearson, spearman = task_metrics.pearson(pred, gold), task_metrics.spearman(pred, gold)
        return {"pearson": pearson, "spearman": spearman, "mse": float(np.mean((pred - gold) ** 2))}
