"""Soft prompts: prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning") and prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation").

Prompt tuning prepends ``num_virtual_tokens`` learned embeddings to the input embeddings of the token
model (the encoder of an encoder-decoder); prefix tuning prepends learned keys and values to the
attention of every layer. In both, the states of the virtual positions are removed again, so heads see
one state per real token. Prompts start from the embeddings of randomly drawn vocabulary tokens (Lester
et al. found this better than random vectors); prefixes from those embeddings passed through each layer's
key and value projections. The stored tensor is PEFT's ``prompt_embeddings`` ([P, H] for prompts,
[P, layers * 2 * H] for prefixes), so an exported adapter loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from multitune.adapters.base import METHODS, AdapterMethod, MethodConfig
from multitune.config.parse import field
from multitune.errors import MultituneError


class SoftPromptAdapter(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(init.detach().float().clone())


def _token_model_path(backbone: nn.Module, token_model: nn.Module) -> str:
    for path, module in backbone.named_modules():
        if module is token_model:
            return path
    raise AssertionError("the token model is not part of the backbone")


def _vocab_sample(embedding: nn.Embedding, n: int) -> torch.Tensor:
    ids = torch.randint(0, embedding.num_embeddings, (n,), device=embedding.weight.device)
    return embedding.weight.detach()[ids].float()


@dataclass
class SoftPromptConfig(MethodConfig):
    """The keys of ``method: prompt`` and ``method: prefix`` (as PEFT's ``PromptTuningConfig`` and
    ``PrefixTuningConfig``)."""

    num_virtual_tokens: int = field(20, help="virtual tokens per adapter", min=1)


class _SoftPromptMethod(AdapterMethod):
    config_class = SoftPromptConfig
    peft_prompt_learning = True

    def sites(self, backbone):
        return [_token_model_path(backbone, self.architecture.token_model(backbone))]

    def _prompts(self, adapters, router, batch: int) -> torch.Tensor:
        ads = adapters()
        stacked = torch.stack([a.prompt_embeddings for a in ads])
        chosen = router.select(stacked)
        return chosen if router.per_row else chosen.unsqueeze(0).expand(batch, *chosen.shape)

    def _extend(self, kwargs: dict, args: tuple, n: int) -> tuple[tuple, dict, torch.Tensor]:
        """Take ``input_ids`` out of the call and prepend ``n`` positions to its masks."""
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        tti = kwargs.get("token_type_ids")
        if tti is not None and self.config.method == "prompt":
            kwargs["token_type_ids"] = torch.cat([tti.new_zeros(tti.shape[0], n), tti], dim=1)
        return args, kwargs, ids

    def attach(self, backbone, path, module, adapters, router):
        n = self.options.num_virtual_tokens
        added = []

        def post(mod, args, output):
            if added and added.pop():
                output.last_hidden_state = output.last_hidden_state[:, n:]
            return output

        return [module.register_forward_pre_hook(self._pre_hook(adapters, router, added), with_kwargs=True),
                module.register_forward_hook(post)]


@METHODS.register("prompt")
class PromptTuningMethod(_SoftPromptMethod):
    peft_type = "PROMPT_TUNING"
    peft_inexact = ("PEFT's prompt tuning keeps the virtual positions in the token states (heads and the decoder "
                    "see them), multitune removes them")
    families = ("encoder", "encoder_decoder")
    # Lester et al. 2021 train prompts at 0.3 with Adafactor; with AdamW about a tenth of it is the usual choice
    default_learning_rate = 3e-2

    def new_adapter(self, backbone, path, module):
        return SoftPromptAdapter(_vocab_sample(module.get_input_embeddings(), self.options.num_virtual_tokens))

    def _pre_hook(self, adapters, router, added):
        def pre(mod, args, kwargs):
            if router.index is None or kwargs.get("input_ids") is None and not args:
                added.append(False)  # e.g. a call with inputs_embeds: leave it alone
                return None
            args, kwargs, ids = self._extend(kwargs, args, self.options.num_virtual_tokens)
            emb = mod.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = torch.cat([self._prompts(adapters, router, len(ids)).to(emb.dtype), emb], 1)
            added.append(True)
            return args, kwargs
        return pre

    def peft_export(self, backbone, adapters):
        import peft  # imported only when used: 2 s

        if self.architecture.type_name != "encoder":
            raise MultituneError("the PEFT layout of prompt tuning is written for encoder backbones only")
        (ad,) = adapters.values()
        cfg = backbone.config
        config = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=ad.prompt_embeddings.shape[0],
                                         token_dim=cfg.hidden_size, num_transformer_submodules=1,
                                         num_attention_heads=cfg.num_attention_heads, num_layers=cfg.num_hidden_layers)
        return config, {"prompt_embeddings": ad.prompt_embeddings}


@METHODS.register("prefix")
class PrefixTuningMethod(_SoftPromptMethod):
    """Prefix tuning for encoder backbones: the prefix enters every layer as a pre-filled key/value cache."""

    peft_type = "PREFIX_TUNING"
    # PEFT 0.21 runs prefix tuning in a task class only through a forward argument named past_key_values,
    # which the encoders of transformers 5 no longer name (they take cache): the stock client raises
    peft_inexact = ("PEFT's task classes cannot run prefix tuning on this backbone (its forward takes no "
                    "past_key_values argument)")
    families = ("encoder",)
    feeds_cache = True
    # without Li & Liang's reparametrising MLP the prefix is trained directly: PEFT-style setups use 1e-3 to 1e-2
    default_learning_rate = 3e-3

    def _shape(self, backbone):
        cfg = backbone.config
        return cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size

    def new_adapter(self, backbone, path, module):
        layers, heads, hidden = self._shape(backbone)
        n = self.options.num_virtual_tokens
        emb = _vocab_sample(module.get_input_embeddings(), n)
        parts = []
        with torch.no_grad():
            for i in range(layers):
                found = [m for p, m in module.named_modules()
                         if p.endswith(f"layer.{i}.attention.self.key") or p.endswith(f"layer.{i}.attention.self.value")]
                if len(found) == 2:
                    parts += [found[0](emb.to(found[0].weight.dtype)).float(), found[1](emb.to(found[1].weight.dtype)).float()]
                else:  # not a BERT-style layout: small random keys and values
                    parts += [torch.randn(n, hidden) * 0.02, torch.randn(n, hidden) * 0.02]
        return SoftPromptAdapter(torch.cat(parts, dim=1))

    def _pre_hook(self, adapters, router, added):
        from transformers import DynamicCache  # imported only when used: 0.5 s

        def pre(mod, args, kwargs):
            if router.index is None or kwargs.get("input_ids") is None and not args:
                added.append(False)
                return None
            layers, heads, hidden = self._shape(mod)
            n = self.options.num_virtual_tokens
            args, kwargs, ids = self._extend(kwargs, args, n)
            kwargs["input_ids"] = ids
            kv = self._prompts(adapters, router, len(ids)).to(mod.get_input_embeddings().weight.dtype)
            # [batch, P, layers*2*hidden] -> per layer (key, value) [batch, heads, P, head_dim], as PEFT lays it out
            kv = kv.reshape(len(ids), n, layers * 2, heads, hidden // heads).permute(2, 0, 3, 1, 4)
            kwargs["past_key_values"] = DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(layers)])
            kwargs["use_cache"] = False
            added.append(False)  # keys and values only: the output has no virtual positions to drop
            return args, kwargs
        return pre

    def peft_export(self, backbone, adapters):
        import peft  # imported only when used: 2 s

        (ad,) = adapters.values()
        layers, heads, hidden = self._shape(backbone)
        config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=ad.prompt_embeddings.shape[0],
                                         token_dim=hidden, num_transformer_submodules=1,
                                         num_attention_heads=heads, num_layers=layers)
        return config, {"prompt_embeddings": ad.prompt_embeddings}
