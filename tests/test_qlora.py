"""k-bit base weights for adapters (adapters.quantize, QLoRA): the config field, the error without
bitsandbytes, and, where bitsandbytes is installed, a tiny LLaMA in 4 bit with LoRA: only the adapters learn,
the base stays 4-bit, and what is saved is a plain float checkpoint that loads anywhere."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import multitune.backbones.quantize as quantize
from multitune.adapters import AdapterSet
from multitune.backbones.architectures import architecture_for
from multitune.backbones.quantize import dequantized_weight, is_quantized, quantize_linear_layers
from multitune.config import parse_config
from multitune.config.adapters import AdapterConfig
from multitune.errors import ConfigError
from multitune.model import load
from multitune.training import train
from tests.conftest import text2text_config

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="needs bitsandbytes (pip install 'multitune[qlora]')")


def _run_config(toy_data, backbone, out, quantize_mode="4bit", method="lora"):
    raw = text2text_config(toy_data, backbone, out, tasks=("sentiment_text",), max_steps=2, eval_every=2,
                           batch_size=4)
    raw["adapters"] = {"method": method, "arrangement": "shared", "quantize": quantize_mode}
    return raw


def test_quantize_field_takes_4bit_8bit_or_null(tmp_path, toy_data, tiny_llama):
    assert parse_config(_run_config(toy_data, tiny_llama, tmp_path / "a")).adapters.quantize == "4bit"
    assert parse_config(_run_config(toy_data, tiny_llama, tmp_path / "a", None)).adapters.quantize is None
    with pytest.raises(ConfigError, match=r"^adapters\.quantize: .*4bit.*8bit"):
        parse_config(_run_config(toy_data, tiny_llama, tmp_path / "a", "3bit"))


def test_without_bitsandbytes_the_run_says_what_to_install(tmp_path, toy_data, tiny_llama, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(quantize.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^adapters\.quantize: needs the bitsandbytes package, which is not "
                                          r"installed: pip install 'multitune\[qlora\]'"):
        train(parse_config(_run_config(toy_data, tiny_llama, tmp_path / "run")), progress=False)
    assert not (tmp_path / "run").exists()


@needs_bnb
@pytest.mark.parametrize(("mode", "layer_class", "stored"), [("4bit", "Linear4bit", torch.uint8),
                                                             ("8bit", "Linear8bitLt", torch.int8)])
def test_kbit_llama_with_lora_trains_only_the_adapters(tiny_llama, mode, layer_class, stored):
    import bitsandbytes as bnb

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    replaced = quantize_linear_layers(model, mode)
    layers = [m for m in model.modules() if is_quantized(m)]
    assert replaced == len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(isinstance(m, getattr(bnb.nn, layer_class)) and m.weight.dtype == stored for m in layers)
    assert not is_quantized(model.lm_head)  # the output layer (tied to the embeddings) stays as it is

    adapters = AdapterSet(AdapterConfig(method="lora", arrangement="shared"), model,
                          architecture_for(model, tok), ["t"])
    model.requires_grad_(False)
    enc = tok(["the film was wonderful", "dull"], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with adapters.route("t"):
        loss = model(**enc, labels=labels, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in adapters.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(m.weight.dtype == stored for m in layers)  # still k-bit

    # the state dict holds float weights (dequantised), the original keys only, close to the original weights
    state = model.state_dict()
    assert state.keys() == original.keys()
    for name, value in original.items():
        assert state[name].dtype == value.dtype and state[name].shape == value.shape, name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[q], dequantized_weight(model.model.layers[0].self_attn.q_proj))
    assert (state[q] - original[q]).norm() < 0.2 * original[q].norm()  # NF4 / int8 rounding, not garbage
    model.load_state_dict(state)  # a checkpoint of the same run loads back into the k-bit layers
    other = {**state, q: state[q] + 1}
    with pytest.raises(RuntimeError, match="keeps its quantised weight"):
        model.load_state_dict(other)


@needs_bnb
def test_a_4bit_run_saves_a_float_model_that_loads_without_bitsandbytes(tmp_path, toy_data, tiny_llama):
    results = train(parse_config(_run_config(toy_data, tiny_llama, tmp_path / "run")), progress=False)
    assert results["train"]["steps"] == 2
    backbone = tmp_path / "run" / "model" / "backbone"
    with safe_open(str(backbone / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float32} and not any("absmax" in k or "quant" in k for k in keys)
    assert "quantization_config" not in json.loads((backbone / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(backbone)  # a stock loader reads it as a plain model
    model = load(tmp_path / "run")
    assert not any(is_quantized(m) for m in model.backbone.modules())
    out = model.predict("sentiment_text", ["the film was wonderful"])
    assert isinstance(out[0]["text"], str)
