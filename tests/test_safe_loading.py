"""Safe loading: weights come from safetensors only, torch files load with weights_only, and no model code
runs unless the config sets trust_remote_code. (Refusals of pickled files through the CLI are cases of
tests/test_bad_input.py.)"""

from __future__ import annotations

import json
import re

import pytest

from multitune.backbones import loading
from multitune.config import parse_config
from multitune.errors import ConfigError, DataError
from tests.conftest import REPO


@pytest.mark.parametrize("trust", [False, True])
def test_backbones_load_from_safetensors_and_trust_code_only_when_asked(tiny_backbone, monkeypatch, trust):
    import transformers

    calls = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModel"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def spy(klass, source, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs))
            return _original(klass, source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    config = parse_config({"backbone": tiny_backbone, "trust_remote_code": trust,
                           "tasks": {"t": {"type": "classification", "data": {"train": {"path": "x.tsv"}}}}},
                          check_files=False)
    loading.load_backbone(config.backbone, config.trust_remote_code)
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModel"}
    assert all(kwargs["trust_remote_code"] is trust for _, kwargs in calls)
    assert [kwargs.get("use_safetensors") for name, kwargs in calls if name == "AutoModel"] == [True]


def test_trust_remote_code_is_off_by_default(tiny_backbone):
    config = parse_config({"backbone": tiny_backbone, "tasks": {"t": {"type": "classification", "data": {
        "train": {"path": "x.tsv"}}}}}, check_files=False)
    assert config.trust_remote_code is False


def test_every_torch_load_is_weights_only():
    calls = [(path, m.group(0)) for path in (REPO / "src").rglob("*.py")
             for m in re.finditer(r"torch\.load\([^)]*\)", path.read_text(encoding="utf-8"))]
    assert calls, "no torch.load found: update this test"
    assert all("weights_only=True" in call for _, call in calls), calls


# -- checks of a model directory before transformers reads it ----------------------------------------------

@pytest.mark.parametrize("make, limit", [
    (lambda t: t.BertConfig(max_position_embeddings=512), 512),
    (lambda t: t.RobertaConfig(max_position_embeddings=514, pad_token_id=1), 512),  # positions start after pad
    (lambda t: t.XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1), 512),
    (lambda t: t.GPT2Config(n_positions=1024), 1024),
    (lambda t: t.LlamaConfig(max_position_embeddings=2048), 2048),
    (lambda t: t.BartConfig(max_position_embeddings=1024), 1024),  # BART's offset of 2 is outside the count
    (lambda t: t.LEDConfig(max_encoder_position_embeddings=16384), 16384),
    (lambda t: t.T5Config(), None),  # relative position buckets: no limit
    (lambda t: t.DebertaV2Config(position_biased_input=False), None),  # DeBERTa-v3: relative positions only
    (lambda t: t.EncoderDecoderConfig.from_encoder_decoder_configs(
        t.BertConfig(max_position_embeddings=256), t.BertConfig()), 256),  # the encoder reads the input
])
def test_position_limits_of_model_families(make, limit):
    import transformers

    from multitune.backbones.checks import check_max_length, position_limit

    config = make(transformers)
    assert (position_limit(config) or (None,))[0] == limit
    check_max_length(config, limit or 100_000, "training.max_length")
    if limit is not None:
        with pytest.raises(ConfigError, match=rf"^training\.max_length: must be at most {limit} for this backbone"):
            check_max_length(config, limit + 1, "training.max_length")


def test_training_refuses_a_max_length_past_the_positions_before_it_builds_the_model(tiny_backbone):
    from multitune.model import MultiTaskModel

    backbone, tokenizer = loading.load_backbone(tiny_backbone)
    with pytest.raises(ConfigError, match=r"^training\.max_length: must be at most 128 .* got 129$"):
        MultiTaskModel(backbone, {}, tokenizer, max_length=129)
    assert MultiTaskModel(backbone, {}, tokenizer, max_length=128).max_length == 128


def test_safetensors_files_are_checked_from_their_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    from multitune.backbones.checks import check_safetensors_files

    save_file({"w": torch.zeros(64)}, str(tmp_path / "a.safetensors"))
    check_safetensors_files(tmp_path)
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[:-8])
    with pytest.raises(DataError, match=r"b\.safetensors: cannot load the weights: not a safetensors file, or a torn"):
        check_safetensors_files(tmp_path)
    (tmp_path / "b.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, tmp_path / "c.safetensors")
    with pytest.raises(DataError, match=r"c\.safetensors: .*pickled data"):
        check_safetensors_files(tmp_path)


def test_a_custom_model_type_loads_its_config_only_with_trust_remote_code(tmp_path):
    from multitune.backbones.checks import read_model_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wonderbert", "auto_map": {
        "AutoConfig": "configuration_wonder.WonderConfig"}}))
    assert read_model_config(tmp_path, trust_remote_code=True)["model_type"] == "wonderbert"
    with pytest.raises(DataError, match=r"config\.json: model_type 'wonderbert' .* only with trust_remote_code"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert read_model_config(tmp_path) == {"model_type": "bert"}
