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

from multitune.backbones.packing import packed_logits
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
        packs: text-to-text training batches can be packed, several examples per row
            (``training.packing``, :mod:`multitune.backbones.packing`); ``text2text_loss`` takes packed batches.
    """

    type_name: ClassVar[str] = "encoder"
    auto_class: ClassVar[str] = "AutoModel"
    causal: ClassVar[bool] = False
    default_pooling: ClassVar[str] = "mean"
    generative: ClassVar[bool] = False
    packs: ClassVar[bool] = False

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

    def target_tokens(self, feature: dict) -> list[int]:
        """The tokens the model is trained to produce for one feature of :meth:`text2text_features` that has a
        target: the continuation of its prompt (the target and the end token)."""
        raise NotImplementedError

    def label_log_likelihoods(self, model: Any, batch: dict[str, torch.Tensor], label_ids: Sequence[Sequence[int]]
                              ) -> torch.Tensor:
        """Log-likelihood of every candidate continuation after every prompt of a batch, in one pass.

        Each prompt is encoded once and shared by all candidates; the candidates are scored teacher-forced,
        exactly as :meth:`text2text_loss` trains them.

        Args:
            model: the backbone (with its adapters routed by the caller).
            batch: a batch of :meth:`text2text_collate` (a target in it is ignored).
            label_ids: the token ids of each candidate, as :meth:`target_tokens` gives them (non-empty).

        Returns:
            Summed log-probabilities [batch, candidates] (float32).
        """
        raise NotImplementedError


def _accepts(module: Any, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def _candidates(label_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token ids [candidates, longest] padded with ``pad_id``, and their mask."""
    if not label_ids or any(len(ids) == 0 for ids in label_ids):
        raise ValueError("every candidate needs at least one token")
    ids = _pad(label_ids, pad_id).to(device)
    mask = _pad([[1] * len(r) for r in label_ids], 0).to(device)
    return ids, mask


def _token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(tokens[:, t]) under ``logits[:, t]``, where ``mask`` is 1 -> [rows]."""
    logp = logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def _returned_cache(output: Any) -> Any:
    """The key/value cache a forward pass returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError("the model returned no key/value cache (use_cache=True)")


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

    def target_tokens(self, feature):
        return list(feature["labels"])

    def label_log_likelihoods(self, model, batch, label_ids):
        from transformers.modeling_outputs import BaseModelOutput

        rows, k = batch["input_ids"].shape[0], len(label_ids)
        labels, label_mask = _candidates(label_ids, self.pad_id, batch["input_ids"].device)
        # the encoder runs once per source; each (source, candidate) row reads its source's states
        states = model.get_encoder()(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
        decoder_input_ids = torch.full_like(labels, self.pad_id)  # as text2text_loss: start, target shifted
        decoder_input_ids[:, 0] = self.start_id
        decoder_input_ids[:, 1:] = labels[:, :-1]
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=states.repeat_interleave(k, 0)),
                       attention_mask=batch["attention_mask"].repeat_interleave(k, 0),
                       decoder_input_ids=decoder_input_ids.repeat(rows, 1), use_cache=False).logits
        return _token_log_probs(logits, labels.repeat(rows, 1), label_mask.repeat(rows, 1)).view(rows, k)


@ARCHITECTURES.register("decoder_only")
class DecoderOnlyArchitecture(BackboneArchitecture):
    """A causal LM (LLaMA, SmolLM2, Qwen, GPT-2...). Text-to-text examples are one sequence, prompt then
    target then the end token, with the loss on the target only. The prompt uses the tokenizer's chat
    template when it has one (and the task allows), else ``prompt + "\\n"``. A feature may instead carry an
    explicit ``labels`` list, which says itself which tokens train (:func:`decoder_labels`; chat tasks train
    every assistant turn). Head tasks read the states of the base model (no vocabulary projection); sentence
    pooling takes the last non-pad token."""

    type_name = "decoder_only"
    auto_class = "AutoModelForCausalLM"
    default_pooling = "last"
    generative = True
    causal = True
    packs = True

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
        labels = [decoder_labels(f) for f in features]
        if any(t != IGNORE_INDEX for row in labels for t in row):
            batch["labels"] = _pad(labels, IGNORE_INDEX)
        return batch

    def text2text_loss(self, model, batch, label_smoothing=0.0):
        if "position_ids" in batch:  # a packed training batch (multitune.backbones.packing)
            logits = packed_logits(model, batch)
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
        # position t predicts token t+1
        return _lm_loss(logits[:, :-1], batch["labels"][:, 1:], label_smoothing)

    def generate(self, model, batch, **settings):
        prompt = batch["prompt_input_ids"]
        out = model.generate(input_ids=prompt, attention_mask=batch["prompt_attention_mask"],
                             pad_token_id=self.pad_id, eos_token_id=self.end_id, do_sample=False, **settings)
        return out[:, prompt.shape[1]:]

    def target_tokens(self, feature):
        ids, start = feature["input_ids"], feature["prompt_length"]
        labels = feature.get("labels")
        if labels is None:
            return list(ids[start:])
        # explicit labels: up to the last trained token (untrained template tokens after it are no answer)
        trained = [t for t in range(start, len(ids)) if labels[t] != IGNORE_INDEX]
        return list(ids[start:trained[-1] + 1]) if trained else list(ids[start:])

    def label_log_likelihoods(self, model, batch, label_ids):
        # The prompts (left-padded, so that every row ends at the last column) run once and their key/value
        # cache is repeated for each candidate; the candidates then run on top of it, right-padded. Position ids
        # count real tokens only, as in the right-padded training sequence.
        prompt, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        rows, k = prompt.shape[0], len(label_ids)
        labels, label_mask = _candidates(label_ids, self.pad_id, prompt.device)
        keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        out = model(input_ids=prompt, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, **keep_last)
        first = out.logits[:, -1].float().log_softmax(-1)  # the distribution of each candidate's first token
        scores = first[:, labels[:, 0]]
        if labels.shape[1] == 1:
            return scores
        cache = _returned_cache(out)
        cache.batch_repeat_interleave(k)  # row i * k + j: prompt i, candidate j
        inputs, targets = labels[:, :-1].repeat(rows, 1), labels[:, 1:].repeat(rows, 1)
        input_mask = label_mask[:, :-1].repeat(rows, 1)
        positions = mask.sum(-1).repeat_interleave(k)[:, None] + torch.arange(inputs.shape[1], device=prompt.device)
        cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"
        logits = model(input_ids=inputs, attention_mask=torch.cat([mask.repeat_interleave(k, 0), input_mask], 1),
                       position_ids=positions, use_cache=True, **{cache_arg: cache}).logits
        rest = _token_log_probs(logits, targets, label_mask[:, 1:].repeat(rows, 1))
        return scores + rest.view(rows, k)


def decoder_labels(feature: dict) -> list[int]:
    """The unshifted labels of one decoder-only feature: its explicit ``labels`` list (``labels[t] ==
    input_ids[t]`` where token ``t`` is trained, -100 elsewhere, e.g. every assistant turn of a conversation),
    else -100 over the first ``prompt_length`` tokens and the tokens themselves after them."""
    if feature.get("labels") is not None:
        return list(feature["labels"])
    cut = feature["prompt_length"]
    return [IGNORE_INDEX] * cut + list(feature["input_ids"][cut:])


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
