"""training.attention: eager attention on a CPU (its sdpa backward is slow at short lengths), chosen by the
config, recorded in results.json, and numerically the same model as sdpa."""

from __future__ import annotations

import pytest
import torch

from multitune.config import parse_config
from multitune.errors import ConfigError
from multitune.training import train
from multitune.training.hardware import resolve_attention
from tests.conftest import toy_config


def test_auto_is_eager_on_a_cpu_and_the_models_default_on_a_gpu():
    assert resolve_attention("auto", on_cpu=True) == "eager"
    assert resolve_attention("auto", on_cpu=False) is None
    assert resolve_attention("sdpa", on_cpu=True) == "sdpa"
    assert resolve_attention("eager", on_cpu=False) == "eager"


@pytest.mark.parametrize("attention, expected", [("auto", "eager"), ("sdpa", "sdpa"), ("eager", "eager")])
def test_the_run_trains_with_the_configured_attention(toy_data, tiny_backbone, tmp_path, attention, expected):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=2, eval_every=2)
    raw["training"]["attention"] = attention
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    results = train(parse_config(raw), progress=False)
    assert results["train"]["attention"] == expected


def test_eager_and_sdpa_compute_the_same_model(tiny_backbone):
    from transformers import AutoModel

    torch.manual_seed(0)
    ids = torch.randint(1000, 5000, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding must be masked the same way by both kernels
    outputs, grads = {}, {}
    for impl in ("sdpa", "eager"):
        model = AutoModel.from_pretrained(tiny_backbone, attn_implementation=impl)
        model.train(False)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out[mask.bool()].pow(2).mean().backward()
        outputs[impl] = out.detach()
        grads[impl] = model.encoder.layer[0].attention.self.query.weight.grad.clone()
    torch.testing.assert_close(outputs["eager"][mask.bool()], outputs["sdpa"][mask.bool()], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["eager"], grads["sdpa"], atol=1e-5, rtol=1e-4)


def test_an_unknown_attention_is_a_config_error(toy_data, tiny_backbone, tmp_path):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=2)
    raw["training"]["attention"] = "flash"
    with pytest.raises(ConfigError, match="training.attention"):
        parse_config(raw)
