"""Freezing, gradual unfreezing and layer-wise learning rates: proven by comparing parameters before and
after optimizer steps, and by reading the optimizer's groups."""

from __future__ import annotations

import json

import pytest
import torch

from multitune.backbones import load_backbone
from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.config.schema import FreezeConfig, GradualUnfreezingConfig
from multitune.errors import ConfigError
from multitune.model import MultiTaskModel
from multitune.optim import (
    GradualUnfreezer,
    apply_freezing,
    build_param_groups,
    parameter_depths,
    parameter_table,
)
from multitune.tasks import TASKS
from tests.conftest import toy_config


def _model(tiny_backbone):
    backbone, tok = load_backbone(tiny_backbone)
    tasks = {}
    for name in ("sentiment", "ner"):
        kind = "classification" if name == "sentiment" else "token_classification"
        impl = TASKS.get(kind)
        tasks[name] = impl(name, from_dict(impl.config_class, {"type": kind, "labels": ["O", "B-PER", "I-PER"]
                                                               if name == "ner" else ["neg", "pos"]}))
        tasks[name].setup([])
    torch.manual_seed(0)
    return MultiTaskModel(backbone, tasks, tok), tok


def _train_steps(model, tok, groups, steps: int, unfreezer=None) -> None:
    """A few AdamW steps alternating the two tasks (the trainer's loop, reduced to what freezing touches)."""
    opt = torch.optim.AdamW(groups, lr=1e-2)
    texts = ["anna visited oslo", "a fine film", "boris left", "a dull film"]
    sent = model.tasks["sentiment"]
    ner = model.tasks["ner"]
    s_batch = sent.collate(sent.encode([{"text": t, "label": "pos" if i % 2 else "neg"}
                                        for i, t in enumerate(texts)], tok, 16), tok.pad_token_id)
    n_batch = ner.collate(ner.encode([{"tokens": t.split(), "tags": ["B-PER"] + ["O"] * (len(t.split()) - 1)}
                                      for t in texts], tok, 16), tok.pad_token_id)
    for step in range(steps):
        if unfreezer is not None:
            unfreezer.update(step)
        name, batch = ("sentiment", s_batch) if step % 2 == 0 else ("ner", n_batch)
        model(name, batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _region(name: str, model) -> str:
    if name.startswith("heads."):
        return "heads." + name.split(".")[1]
    depths, n_layers = parameter_depths(model.backbone.named_parameters())
    d = depths[name[len("backbone."):]]
    return "embeddings" if d == 0 else ("top" if d > n_layers else f"layer{d - 1}")


def _changed_regions(before, model) -> set[str]:
    return {_region(n, model) for n in _changed(before, model)}


# the pooler ("top") feeds no task here (mean pooling), so it never receives a gradient
ALL = {"embeddings", "layer0", "layer1", "heads.sentiment", "heads.ner"}


@pytest.mark.parametrize(("freeze", "trained"), [
    ({}, ALL),
    ({"backbone": True}, {"heads.sentiment", "heads.ner"}),
    ({"embeddings": True}, ALL - {"embeddings"}),
    ({"layers": [0, 0]}, ALL - {"layer0"}),
    ({"layers": [0, 1]}, {"embeddings", "heads.sentiment", "heads.ner"}),
    ({"heads": ["ner"]}, ALL - {"heads.ner"}),
])
def test_each_freezing_mode_trains_exactly_the_intended_parameters(tiny_backbone, freeze, trained):
    model, tok = _model(tiny_backbone)
    model.train()
    apply_freezing(model.backbone, model.heads, from_dict(FreezeConfig, freeze))
    groups = build_param_groups(model.backbone, [("heads", model.heads)], 1e-2, 1e-2, 0.0)
    before = _snapshot(model)
    _train_steps(model, tok, groups, 4)
    assert _changed_regions(before, model) == trained
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & _changed(before, model)


def test_freezing_word_embeddings_keeps_the_rest_of_the_embedding_layer_training(tiny_backbone):
    model, tok = _model(tiny_backbone)
    model.train()
    apply_freezing(model.backbone, model.heads, from_dict(FreezeConfig, {"word_embeddings": True}))
    groups = build_param_groups(model.backbone, [("heads", model.heads)], 1e-2, 1e-2, 0.0)
    before = _snapshot(model)
    _train_steps(model, tok, groups, 4)
    words = "backbone.embeddings.word_embeddings.weight"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {words}
    changed = _changed(before, model)
    assert words not in changed and "embeddings" in _changed_regions(before, model)
    assert "backbone.embeddings.position_embeddings.weight" in changed


def test_gradual_unfreezing_releases_one_group_from_the_top(tiny_backbone):
    model, tok = _model(tiny_backbone)
    model.train()
    groups = build_param_groups(model.backbone, [("heads", model.heads)], 1e-2, 1e-2, 0.0)
    unfreezer = GradualUnfreezer(model.backbone, GradualUnfreezingConfig(every=2), steps_per_epoch=10)
    opened = []
    for steps in (2, 4, 6, 8):
        before = _snapshot(model)
        _train_steps(model, tok, groups, 2, unfreezer=None)  # two steps with the current state
        opened.append(_changed_regions(before, model) - {"heads.sentiment", "heads.ner"})
        unfreezer.update(steps)
    # steps 0-1: heads only; 2-3: + top layer (and pooler); 4-5: + layer 0; 6-7: + embeddings
    assert opened == [set(), {"layer1"}, {"layer1", "layer0"}, ALL - {"heads.sentiment", "heads.ner"}]
    steps = unfreezer.unfreeze_steps()
    assert sorted(set(steps.values())) == [2, 4, 6]
    # depth limits how far it goes; epochs count passes over the data
    model2, _ = _model(tiny_backbone)
    build_param_groups(model2.backbone, [("heads", model2.heads)], 1e-2, 1e-2, 0.0)
    limited = GradualUnfreezer(model2.backbone, GradualUnfreezingConfig(every=1, unit="epochs", depth=1),
                               steps_per_epoch=5)
    assert limited.every == 5 and sorted(set(limited.unfreeze_steps().values())) == [5]
    limited.update(100)
    emb = [p for n, p in model2.backbone.named_parameters() if "embeddings" in n]
    assert not any(p.requires_grad for p in emb)


def test_layer_wise_learning_rates_and_no_decay_groups(tiny_backbone):
    model, _ = _model(tiny_backbone)
    groups = build_param_groups(model.backbone, [("heads", model.heads)], 1e-3, 5e-3, 0.01, layer_lr_decay=0.5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone/top"]["lr"] == pytest.approx(1e-3)
    assert by_name["backbone/layer_01"]["lr"] == pytest.approx(1e-3)
    assert by_name["backbone/layer_00"]["lr"] == pytest.approx(5e-4)
    assert by_name["backbone/embeddings"]["lr"] == pytest.approx(2.5e-4)
    assert by_name["heads"]["lr"] == pytest.approx(5e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        kinds = {("norm" in names[id(p)].lower() or names[id(p)].endswith("bias")) for p in g["params"]}
        assert kinds == {g["name"].endswith("/no_decay")}
        assert g["weight_decay"] == (0.0 if g["name"].endswith("/no_decay") else 0.01)
    total = sum(p.numel() for p in model.parameters())
    table = parameter_table(groups, model.backbone, [("heads", model.heads)])
    assert sum(r["trainable"] + r["frozen"] for r in table) == total
    assert {r["group"]: r["lr"] for r in table}["backbone/layer_00"] == pytest.approx(5e-4)


def test_trainer_feature_extraction_keeps_the_backbone_and_logs_unfreezing(tiny_backbone, toy_data, tmp_path):
    from safetensors.torch import load_file

    from multitune.training import train

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "fx", max_steps=4, eval_every=4)
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    raw["freeze"] = "backbone"
    train(parse_config(raw), progress=False)
    initial = load_file(f"{tiny_backbone}/model.safetensors")
    trained = load_file(str(tmp_path / "fx" / "model" / "backbone" / "model.safetensors"))
    assert all(torch.equal(initial[k], trained[k]) for k in initial)
    table = json.loads((tmp_path / "fx" / "parameters.json").read_text())
    assert all(r["trainable"] == 0 for r in table if r["group"].startswith("backbone/"))

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "gu", max_steps=6, eval_every=6)
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    raw["training"].update(gradual_unfreezing={"every": 2}, layer_lr_decay=0.9)
    train(parse_config(raw), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "gu" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["groups_open"]) for r in rows if r["kind"] == "unfreeze"] == [(2, 1), (4, 2)]
    table = {r["group"]: r for r in json.loads((tmp_path / "gu" / "parameters.json").read_text())}
    assert table["backbone/embeddings"]["unfreezes_at_step"] == 6
    assert table["backbone/layer_00"]["lr"] == pytest.approx(table["backbone/layer_01"]["lr"] * 0.9)


@pytest.mark.parametrize(("change", "message"), [
    ({"freeze": "everything"}, r"freeze: got 'everything'; expected one of: none, backbone, embeddings"),
    ({"freeze": {"heads": ["nope"]}}, r"freeze.heads: no task 'nope'"),
    ({"freeze": {"layers": [3, 1]}}, r"freeze.layers: expected \[first, last\]"),
    ({"freeze": "backbone", "training": {"gradual_unfreezing": {"every": 5}}}, r"training.gradual_unfreezing"),
    ({"training": {"layer_lr_decay": 1.5}}, r"training.layer_lr_decay: must be at most 1.0"),
])
def test_freezing_config_errors(change, message):
    raw = {"tasks": {"a": {"type": "classification", "data": {"train": {"path": "x"}}}}, **change}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, check_files=False)


def test_layer_range_past_the_backbone_is_an_error(tiny_backbone):
    model, _ = _model(tiny_backbone)
    with pytest.raises(ConfigError, match=r"freeze.layers: the backbone has 2 layers \(0..1\), got \[1, 2\]"):
        apply_freezing(model.backbone, model.heads, FreezeConfig(layers=[1, 2]))


@pytest.mark.parametrize("with_mlm", [False, True])
def test_word_embeddings_are_frozen_by_default_unless_a_task_outputs_through_them(toy_data, tiny_backbone, tmp_path,
                                                                                 with_mlm):
    from safetensors.torch import load_file

    from multitune.training import train

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=4, eval_every=4)
    if not with_mlm:
        raw["tasks"].pop("mlm")
    train(parse_config(raw), progress=False)
    key = "embeddings.word_embeddings.weight"
    saved = load_file(str(tmp_path / "run" / "model" / "backbone" / "model.safetensors"))
    original = load_file(f"{tiny_backbone}/model.safetensors")
    # the masked-LM head decodes through the word embeddings: they train with it; otherwise they stay
    assert torch.equal(saved[key], original[key]) is not with_mlm
    assert not torch.equal(saved["embeddings.position_embeddings.weight"],
                           original["embeddings.position_embeddings.weight"])
    row = next(r for r in json.loads((tmp_path / "run" / "parameters.json").read_text())
               if r["group"] == "backbone/embeddings")
    assert (row["frozen"] == original[key].numel()) is not with_mlm


def test_freeze_none_trains_the_word_embeddings_too(toy_data, tiny_backbone, tmp_path):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run")
    assert parse_config(raw).freeze.word_embeddings is None  # the default: decided from the backbone and tasks
    assert parse_config({**raw, "freeze": "none"}).freeze.word_embeddings is False
    assert parse_config({**raw, "freeze": {"word_embeddings": True}}).freeze.word_embeddings is True


@pytest.mark.parametrize("change,expected", [
    ({}, 1e-2),                                        # linear heads trained from scratch: the measured rate
    ({"sentiment": {"head": "pooler"}}, 1e-3),         # a head that starts from the pretrained pooler
    ({"mlm": None}, 1e-3),                             # the masked-LM head: no measured rate
    ({"training": {"head_learning_rate": 3e-4}}, 3e-4),  # set explicitly
])
def test_default_head_learning_rate(toy_data, tiny_backbone, tmp_path, change, expected):
    from multitune.training import train

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=1, eval_every=1)
    keep_mlm = "mlm" in change
    if not keep_mlm:
        raw["tasks"].pop("mlm")
    for task in ("sentiment", "similarity"):
        raw["tasks"][task]["head"] = "pooled"
    for key, value in change.items():
        if key == "training":
            raw["training"].update(value)
        elif value is not None:
            raw["tasks"][key].update(value)
    train(parse_config(raw), progress=False)
    table = json.loads((tmp_path / "run" / "parameters.json").read_text())
    heads = {r["group"]: r["lr"] for r in table if r["group"].startswith("heads/")}
    assert heads and set(heads.values()) == {expected}
    assert {r["lr"] for r in table if r["group"].startswith("backbone/") and r["trainable"]} == {1e-3}
