"""Masked-language-model continual pretraining on raw text (domain adaptation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from multitune.config.parse import field
from multitune.config.schema import MAX_SEED, TaskConfig
from multitune.errors import ConfigError
from multitune.tasks.base import (
    IGNORE_INDEX,
    PROBE_TEXTS,
    TASKS,
    ExportSpec,
    Task,
    TaskOutput,
    collate_inputs,
    tokenize_texts,
)


@dataclass
class MaskedLMConfig(TaskConfig):
    mask_probability: float = field(0.15, help="fraction of tokens selected for prediction", gt=0.0, max=0.9)
    eval_seed: int = field(1234, help="seed of the fixed masks used for evaluation, so perplexities compare",
                           min=0, max=MAX_SEED)


class MaskedLMHead(nn.Module):
    """Transform + decoder onto the vocabulary; the decoder matrix is the backbone's input embedding
    matrix (tied, as in BERT), passed in at call time so that a resized vocabulary stays tied."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(h, embedding_weight, self.bias[: embedding_weight.size(0)])


@TASKS.register("masked_lm")
class MaskedLMTask(Task):
    """BERT-style masking: 15% of tokens are selected; of those 80% become [MASK], 10% a random token,
    10% stay (Devlin et al., 2019). Special tokens are never selected.

    Metrics: ``perplexity`` (exp of the mean masked-token loss) and ``accuracy`` of masked tokens. The
    main metric is ``accuracy`` (higher is better); perplexity is reported beside it.
    """

    config_class = MaskedLMConfig
    fields = ("text",)
    required = ("text",)
    main_metric = "accuracy"
    lower_is_better = frozenset({"loss", "perplexity"})
    outputs_word_embeddings = True  # the head's decoder is the input embedding matrix

    def __init__(self, name: str, config: MaskedLMConfig):
        super().__init__(name, config)
        self.mask_token_id: int | None = None
        self.vocab_size: int = 0
        self.special_ids: list[int] = []

    def bind(self, architecture, tokenizer) -> None:
        super().bind(architecture, tokenizer)
        if architecture.causal:
            raise ConfigError(f"tasks.{self.name}.type", f"masked_lm needs a bidirectional backbone (encoder or "
                                                         f"encoder_decoder), not {architecture.type_name}")
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"tasks.{self.name}.type", "masked_lm needs a tokenizer with a mask token")
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = sorted(set(tokenizer.all_special_ids))

    def encode(self, examples: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict]:
        return tokenize_texts(tokenizer, [ex["text"] for ex in examples], None, max_length)

    def collate(self, features, pad_token_id, generator=None):
        batch = collate_inputs(features, pad_token_id)
        ids = batch["input_ids"]
        # Masks are drawn at batch time from the caller's seeded generator, so each epoch sees new masks.
        gen = generator if generator is not None else torch.Generator().manual_seed(self.config.eval_seed)
        special = torch.isin(ids, torch.tensor(self.special_ids)) | (batch["attention_mask"] == 0)
        chosen = (torch.rand(ids.shape, generator=gen) < self.config.mask_probability) & ~special
        if not chosen.any():  # always predict at least one token per batch
            candidates = (~special).nonzero()
            if len(candidates):
                r, c = candidates[torch.randint(len(candidates), (1,), generator=gen)][0]
                chosen[r, c] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        roll = torch.rand(ids.shape, generator=gen)
        masked = ids.clone()
        masked[chosen & (roll < 0.8)] = self.mask_token_id
        randomise = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[randomise] = torch.randint(self.vocab_size, ids.shape, generator=gen)[randomise]
        batch["input_ids"], batch["labels"] = masked, labels
        return batch

    def build_head(self, hidden_size: int) -> nn.Module:
        return MaskedLMHead(hidden_size, self.vocab_size or 1)

    def warm_start_head(self, head: nn.Module, backbone: nn.Module) -> None:
        """The head's layer norm takes the backbone's epsilon (BERT: 1e-12), as the backbone's own MLM head
        does, so that the exported ``AutoModelForMaskedLM`` computes the same logits."""
        eps = getattr(getattr(backbone, "config", None), "layer_norm_eps", None)
        if isinstance(head, MaskedLMHead) and eps is not None:
            head.norm.eps = float(eps)

    def forward(self, model, head, batch) -> TaskOutput:
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        # Only masked positions go through the vocabulary projection: it is the costly part.
        logits = head(hidden[selected], model.input_embedding_weight()).float()
        token_loss = F.cross_entropy(logits, labels[selected], reduction="none")
        rows = selected.nonzero()[:, 0]
        zeros = torch.zeros(len(labels), device=labels.device)
        row_loss = zeros.index_add(0, rows, token_loss.detach())
        row_count = zeros.index_add(0, rows, torch.ones_like(token_loss))
        row_correct = zeros.index_add(0, rows, (logits.argmax(-1) == labels[selected]).float())
        loss = token_loss.sum() / selected.sum().clamp(min=1)
        return TaskOutput(loss, {"loss_sum": row_loss, "count": row_count, "correct": row_correct})

    def decode(self, output, batch, examples) -> list[dict]:
        """Per example: the summed loss, number and correct count of its masked tokens, and its
        pseudo-perplexity (exp of the mean masked-token loss)."""
        out = output.outputs
        preds = []
        for loss, count, correct in zip(out["loss_sum"].tolist(), out["count"].tolist(), out["correct"].tolist()):
            ppl = math.exp(min(loss / count, 50.0)) if count else None
            preds.append({"loss_sum": loss, "masked_tokens": int(count), "correct": int(correct),
                          "perplexity": ppl})
        return preds

    def compute_metrics(self, predictions, examples) -> dict[str, float]:
        loss = sum(p["loss_sum"] for p in predictions)
        count = max(sum(p["masked_tokens"] for p in predictions), 1)
        return {"perplexity": float(math.exp(min(loss / count, 50.0))),
                "accuracy": sum(p["correct"] for p in predictions) / count,
                "loss": loss / count}

    def export_spec(self) -> ExportSpec:
        """``AutoModelForMaskedLM`` (``pipeline("fill-mask")``): vocabulary ``logits`` at every position."""

        def logits(model, head, batch):
            hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            return head(hidden, model.input_embedding_weight()).float()

        return ExportSpec("masked_lm", "fill-mask", {}, list(PROBE_TEXTS), logits)

    def state(self) -> dict:
        return {"mask_token_id": self.mask_token_id, "vocab_size": self.vocab_size,
                "special_ids": self.special_ids}

    def load_state(self, state: dict) -> None:
        self.mask_token_id = state["mask_token_id"]
        self.vocab_size = state["vocab_size"]
        self.special_ids = list(state["special_ids"])



