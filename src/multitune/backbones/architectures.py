"""Backbone families: how each gives token states to task heads and, for generative families, how a
(prompt, target) pair becomes model inputs, a teacher-forced loss and generated text.

Tasks never branch on the family: they call these methods, and a family declares what it can do
(``generative``, ``default_pooling``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from multitune.backbones.unpadded import runs_unpadded, unpadded_hidden_states
from multitune.registry import Registry

ARCHITECTURES: Registry[type[BackboneArchitecture]] = Registry("backbone type")

IGNORE_INDEX = -100


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            if left:
                out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def end_token_id(tokenizer: Any) -> int | None:
    """The id that ends a generated text: ``eos`` ([SEP] for BERT-style tokenizers that have no eos)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


class BackboneArchitecture:
    """What multitune needs from one model family. Stateless apart from the tokenizer's special ids.

    Class attributes:
        auto_class: the transformers Auto class that reloads a saved backbone of this family.
        default_pooling: sentence pooling of head tasks when the config sets none.
        generative: the family can be trained on and generate text (``text2text`` tasks).
        causal: token states only see the tokens to their left (masked-LM training makes no sense).
    """

    type_name: ClassVar[str] = "encoder"
    auto_class: ClassVar[str] = "AutoModel"
    causal: ClassVar[bool] = False
    default_pooling: ClassVar[str] = "mean"
    generative: ClassVar[bool] = False

    def __init__(self, tokenizer: Any):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.end_id = end_token_id(tokenizer)

    def token_model(self, model: Any) -> Any:
        """The module whose output ``last_hidden_state`` feeds task heads."""
        return model

    def hidden_states(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, unpadded: bool = False) -> torch.Tensor:
        """Token states [batch, tokens, hidden] for head tasks.

        ``unpadded``: run the token model on the real tokens only where that gives the same states
        (:mod:`multitune.backbones.unpadded`; zeros at padded positions), else padded, with a warning once.
        """
        module = self.token_model(model)
        if unpadded and runs_unpadded(module):
            return unpadded_hidden_states(module, input_ids, attention_mask, token_type_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and _accepts(module, "token_type_ids"):
            kwargs["token_type_ids"] = token_type_ids
        return module(**kwargs).last_hidden_state

    def hidden_size(self, model: Any) -> int:
        return int(self.token_model(model).config.hidden_size)

    # -- text-to-text (generative families only) ------------------------------------------------
    def text2text_features(self, tokenizer: Any, source: str, target: str | None, max_length: int,
                           max_target_length: int, chat_template: bool) -> dict:
        """Token ids of one example (the target may be absent at prediction time)."""
        raise NotImplementedError

    def text2text_collate(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Pad features into a batch: model inputs, ``labels`` (-100 where no loss) and generation inputs."""
        raise NotImplementedError

    def text2text_loss(self, model: Any, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
                       ) -> torch.Tensor:
        """Teacher-forced cross-entropy, averaged over target tokens."""
        raise NotImplementedError

    def generate(self, model: Any, batch: dict[str, torch.Tensor], **settings: Any) -> torch.Tensor:
        """Generated token ids [batch, new tokens] (prompt removed), padded with ``pad_id``."""
        raise NotImplementedError


def _accepts(module: Any, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


@ARCHITECTURES.register("encoder")
class EncoderArchitecture(BackboneArchitecture):
    """A bidirectional encoder (BERT, RoBERTa, MiniLM, DeBERTa...): token states for head tasks only."""


@ARCHITECTURES.register("encoder_decoder")
class EncoderDecoderArchitecture(BackboneArchitecture):
    """T5, BART, Marian, mT5 or a warm-started bert2bert. Head tasks read the encoder's states; text-to-text
    tasks feed the source to the encoder and learn the target with the decoder."""

    type_name = "encoder_decoder"
    auto_class = "AutoModelForSeq2SeqLM"
    generative = True

    def __init__(self, tokenizer: Any, model_config: Any = None):
        super().__init__(tokenizer)
        start = getattr(model_config, "decoder_start_token_id", None) if model_config is not None else None
        self.start_id = start if start is not None else self.pad_id

    def token_model(self, model: Any) -> Any:
        return model.get_encoder()

    def text2text_features(self, tokenizer, source, target, max_length, max_target_length, chat_template):
        feat = {"input_ids": tokenizer(source, truncation=True, max_length=max_length)["input_ids"]}
        if target is not None:
            ids = tokenizer(text_target=target, truncation=True, max_length=max_target_length + 1)["input_ids"]
            if ids and ids[0] == self.start_id:  # BERT-style [CLS]: the decoder's start token, not a target
                ids = ids[1:]
            feat["labels"] = ids[:max_target_length]
        return feat

    def text2text_collate(self, features):
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": _pad(ids, self.pad_id), "attention_mask": _pad([[1] * len(r) for r in ids], 0)}
        if "labels" in features[0]:
            batch["labels"] = _pad([f["labels"] for f in features], IGNORE_INDEX)
        return batch

    def text2text_loss(self, model, batch, label_smoothing=0.0):
        labels = batch["labels"]
        # decoder input: the start token, then the target shifted right (padding where the target ended)
        decoder_input_ids = torch.full_like(labels, self.pad_id)
        decoder_input_ids[:, 0] = self.start_id
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids, use_cache=False).logits
        return _lm_loss(logits, labels, label_smoothing)

    def generate(self, model, batch, **settings):
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             decoder_start_token_id=self.start_id, pad_token_id=self.pad_id,
                             eos_token_id=self.end_id, do_sample=False, **settings)
        return out[:, 1:]  # drop the decoder start token


@ARCHITECTURES.register("decoder_only")
class DecoderOnlyArchitecture(BackboneArchitecture):
    """A causal LM (LLaMA, SmolLM2, Qwen, GPT-2...). Text-to-text examples are one sequence, prompt then
    target then the end token, with the loss on the target only. The prompt uses the tokenizer's chat
    template when it has one (and the task allows), else ``prompt + "\\n"``. Head tasks read the states of
    the base model (no vocabulary projection); sentence pooling takes the last non-pad token."""

    type_name = "decoder_only"
    auto_class = "AutoModelForCausalLM"
    default_pooling = "last"
    generative = True
    causal = True

    def __init__(self, tokenizer: Any, model_config: Any = None):
        super().__init__(tokenizer)
        self._templates: dict[bool, tuple[list[int], list[int]]] = {}
        self._tokenizer = tokenizer

    def token_model(self, model: Any) -> Any:
        return model.base_model

    def _template(self, chat_template: bool) -> tuple[list[int], list[int]]:
        """Token ids around the user text: rendered once with a sentinel and split, so that a long source is
        truncated without cutting the template's own tokens."""
        use_chat = chat_template and bool(getattr(self._tokenizer, "chat_template", None))
        if use_chat not in self._templates:
            if use_chat:
                sentinel = "\u2063MULTITUNE_SOURCE\u2063"
                text = self._tokenizer.apply_chat_template([{"role": "user", "content": sentinel}],
                                                           add_generation_prompt=True, tokenize=False)
                before, _, after = text.partition(sentinel)
            else:
                before, after = "", "\n"
            encode = lambda s: self._tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
            self._templates[use_chat] = (encode(before), encode(after))
        return self._templates[use_chat]

    def text2text_features(self, tokenizer, source, target, max_length, max_target_length, chat_template):
        before, after = self._template(chat_template)
        src = tokenizer(source, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        prompt = before + src + after
        feat = {"input_ids": prompt, "prompt_length": len(prompt)}
        if target is not None:
            tgt = tokenizer(target, add_special_tokens=False)["input_ids"][: max_target_length - 1]
            feat["input_ids"] = prompt + tgt + [self.end_id]
        return feat

    def text2text_collate(self, features):
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": _pad(ids, self.pad_id), "attention_mask": _pad([[1] * len(r) for r in ids], 0)}
        prompts = [f["input_ids"][: f["prompt_length"]] for f in features]
        # generation continues the prompt, so prompts are padded on the left
        batch["prompt_input_ids"] = _pad(prompts, self.pad_id, left=True)
        batch["prompt_attention_mask"] = _pad([[1] * len(r) for r in prompts], 0, left=True)
        if any(len(f["input_ids"]) > f["prompt_length"] for f in features):
            labels = [[IGNORE_INDEX] * f["prompt_length"] + f["input_ids"][f["prompt_length"]:] for f in features]
            batch["labels"] = _pad(labels, IGNORE_INDEX)
        return batch

    def text2text_loss(self, model, batch, label_smoothing=0.0):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        # position t predicts token t+1
        return _lm_loss(logits[:, :-1], batch["labels"][:, 1:], label_smoothing)

    def generate(self, model, batch, **settings):
        prompt = batch["prompt_input_ids"]
        out = model.generate(input_ids=prompt, attention_mask=batch["prompt_attention_mask"],
                             pad_token_id=self.pad_id, eos_token_id=self.end_id, do_sample=False, **settings)
        return out[:, prompt.shape[1]:]


def architecture_for(model: Any, tokenizer: Any, name: str | None = None) -> BackboneArchitecture:
    """The family of a loaded model: ``name`` when given, else encoder-decoder when its config says so,
    decoder-only when it can generate, encoder otherwise."""
    if name is None:
        if getattr(model.config, "is_encoder_decoder", False):
            name = "encoder_decoder"
        elif getattr(model, "can_generate", lambda: False)():
            name = "decoder_only"
        else:
            name = "encoder"
    cls = ARCHITECTURES.get(name, "backbone.type")
    if cls is EncoderArchitecture:
        return cls(tokenizer)
    return cls(tokenizer, model.config)
