"""Safe loading: weights come from safetensors only, torch files load with weights_only, and no model code
runs unless the config sets trust_remote_code. (Refusals of pickled files through the CLI are cases of
tests/test_bad_input.py.)"""

from __future__ import annotations

import re

import pytest

from multitune.backbones import loading
from multitune.config import parse_config
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
