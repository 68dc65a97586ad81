"""Model classes for task heads that no stock transformers class computes (mean or max pooling, a pooled
regression head, heads on decoder-only or encoder-decoder backbones).

multitune copies this file into an exported model directory and registers its classes in ``config.json``
(``auto_map``), so that ``AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)``
and ``pipeline(..., trust_remote_code=True)`` compute exactly what the model computed in multitune. Without
``trust_remote_code`` transformers refuses the directory (its ``model_type`` is ``multitune``) instead of loading
a newly initialised head. The file depends on torch and transformers only.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForTextEncoding,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

BACKBONE_CLASSES = {"AutoModel": AutoModel, "AutoModelForTextEncoding": AutoModelForTextEncoding}


class MultituneConfig(PretrainedConfig):
    """A task model exported by multitune.

    Args:
        backbone: the backbone's own ``config.json`` content (``model_type`` included).
        backbone_class: the Auto class that builds the backbone from it (``AutoModel`` or
            ``AutoModelForTextEncoding``).
        hidden_size: width of the token states the head reads.
        pooling: ``mean``, ``cls``, ``max`` or ``last`` (the last non-pad token, right padding).
        head: ``pooled`` (pooled states -> dropout -> linear) or ``pooler`` (first token -> dense -> tanh ->
            dropout -> linear); token classification ignores it.
        normalize_embeddings: the sentence embedding of :class:`MultituneModel` is L2-normalised.
        classifier_dropout: dropout before the linear layer (training only).
    """

    model_type = "multitune"

    def __init__(self, backbone: dict | None = None, backbone_class: str = "AutoModel", hidden_size: int = 0,
                 pooling: str = "mean", head: str = "pooled", normalize_embeddings: bool = False,
                 classifier_dropout: float = 0.1, **kwargs):
        self.backbone = backbone or {}
        self.backbone_class = backbone_class
        self.hidden_size = hidden_size
        self.pooling = pooling
        self.head = head
        self.normalize_embeddings = normalize_embeddings
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)

    def backbone_config(self) -> PretrainedConfig:
        settings = dict(self.backbone)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Sentence vectors from token states [batch, tokens, hidden], ignoring padding."""
    if method == "cls":
        return hidden[:, 0]
    if method == "max":
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).max(1).values
    if method == "last":
        last = (mask.sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MultitunePreTrainedModel(PreTrainedModel):
    config_class = MultituneConfig
    base_model_prefix = "backbone"

    def __init__(self, config: MultituneConfig):
        super().__init__(config)
        self.backbone = BACKBONE_CLASSES[config.backbone_class].from_config(config.backbone_config())

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def token_states(self, input_ids, attention_mask=None, token_type_ids=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's token states [batch, tokens, hidden] and the attention mask (all ones if None)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in inspect.signature(self.backbone.forward).parameters:
            kwargs["token_type_ids"] = token_type_ids
        return self.backbone(**kwargs).last_hidden_state, attention_mask

    def _init_weights(self, module: nn.Module) -> None:  # weights come from the checkpoint
        if isinstance(module, nn.Linear) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class MultituneModel(MultitunePreTrainedModel):
    """Token states and the sentence embedding (``pooler_output``: pooled and, when configured, normalised),
    for ``AutoModel`` and sentence-transformers."""

    def __init__(self, config: MultituneConfig):
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        hidden, attention_mask = self.token_states(input_ids, attention_mask, token_type_ids)
        embedding = pool(hidden, attention_mask, self.config.pooling)
        if self.config.normalize_embeddings:
            embedding = F.normalize(embedding, dim=-1)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=embedding)


class MultituneForSequenceClassification(MultitunePreTrainedModel):
    """Sentence (pair) classification or regression: ``logits`` [batch, num_labels]."""

    def __init__(self, config: MultituneConfig):
        super().__init__(config)
        if config.head == "pooler":
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        hidden, attention_mask = self.token_states(input_ids, attention_mask, token_type_ids)
        if self.config.head == "pooler":
            pooled = torch.tanh(self.dense(hidden[:, 0]))
        else:
            pooled = pool(hidden, attention_mask, self.config.pooling)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            elif self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class MultituneForTokenClassification(MultitunePreTrainedModel):
    """Tagging: ``logits`` [batch, tokens, num_labels]; each word's tag is read on its first sub-token."""

    def __init__(self, config: MultituneConfig):
        super().__init__(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        hidden, _ = self.token_states(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits)
