"""Cheaper inference: a bf16 backbone and dynamic int8 quantisation give (nearly) the fp32 model's answers,
``precision: auto`` resolves to what the machine computes natively, and bad requests are refused."""

from __future__ import annotations

import pytest
import torch

from multitune.cli import main
from multitune.config import parse_config
from multitune.errors import MultituneError
from multitune.model import MultiTaskModel
from multitune.training import train
from multitune.training.hardware import bf16_supported, resolve_precision
from tests.conftest import toy_config

TEXTS = ["the film was great", "the meal was awful", "a fine day", "boris met anna in oslo"]


def _trained(toy_data, tiny_backbone, out, **extra):
    raw = toy_config(toy_data, tiny_backbone, out, max_steps=6, eval_every=6)
    raw["tasks"].pop("mlm")
    raw.update(extra)
    train(parse_config(raw), progress=False)
    return out


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cheaper_inference_matches_fp32(toy_data, tiny_backbone, tmp_path, precision):
    run = _trained(toy_data, tiny_backbone, tmp_path / "run")
    full = MultiTaskModel.load(run)
    cheap = MultiTaskModel.load(run, precision=precision)
    assert cheap.inference_precision == precision
    if precision == "bf16":
        assert next(cheap.backbone.parameters()).dtype == torch.bfloat16
    else:
        assert any("quantized" in type(m).__module__ for m in cheap.backbone.modules())
    a, b = full.predict("sentiment", TEXTS), cheap.predict("sentiment", TEXTS)
    for x, y in zip(a, b):
        assert y["scores"] == pytest.approx(x["scores"], abs=0.05)
    sa = [r["score"] for r in full.predict("similarity", [("a cat", "a dog"), ("a film", "a film")])]
    sb = [r["score"] for r in cheap.predict("similarity", [("a cat", "a dog"), ("a film", "a film")])]
    assert sb == pytest.approx(sa, abs=0.25)
    assert isinstance(cheap.predict("ner", ["boris met anna"])[0]["entities"], list)


def test_int8_refuses_adapters_and_unknown_precision(toy_data, tiny_backbone, tmp_path, capsys):
    run = _trained(toy_data, tiny_backbone, tmp_path / "run", adapters={"method": "lora"})
    with pytest.raises(MultituneError, match="int8 quantises the backbone's linear layers"):
        MultiTaskModel.load(run, precision="int8")
    bf16 = MultiTaskModel.load(run, precision="bf16")  # adapter hooks cast at their boundary
    assert bf16.predict("sentiment", TEXTS[:1])[0]["label"] in {"negative", "positive"}
    with pytest.raises(MultituneError, match="precision: expected one of fp32, bf16, int8"):
        MultiTaskModel.load(run, precision="fp16")
    assert main(["predict", str(run), "--task", "sentiment", "--precision", "int8", "a text"]) == 2
    assert "int8" in capsys.readouterr().err


def test_auto_precision_follows_the_hardware(toy_data, tiny_backbone, tmp_path):
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if bf16_supported("cpu") else "fp32")
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=2, eval_every=2, precision="auto")
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    results = train(parse_config(raw), progress=False)
    assert results["train"]["precision"] == resolve_precision("auto", "cpu")
