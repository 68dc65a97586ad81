"""Parameter-efficient methods: every method x arrangement trains exactly its adapters (and the heads),
saves, reloads and predicts; merge equivalence; PEFT-format round trip; mixed-task batches."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from multitune.adapters import METHODS, AdapterConfig
from multitune.backbones import load_backbone
from multitune.cli import main
from multitune.config import parse_config
from multitune.config.parse import from_dict, to_dict
from multitune.errors import ConfigError
from multitune.model import MultiTaskModel
from multitune.tasks import TASKS
from multitune.training import train
from multitune.training.setup import ADAPTER_HEAD_LEARNING_RATE
from tests.conftest import text2text_config, toy_config

ARRANGEMENTS = ["per_task", "shared", "shared_conditioned"]
TEXTS = ["anna visited oslo", "a fine film", "boris left lima", "a dull film"]


def _model(backbone_dir, method, arrangement, **extra):
    backbone, tok = load_backbone(backbone_dir)
    tasks = {}
    for name, kind, labels in (("sentiment", "classification", ["neg", "pos"]),
                               ("ner", "token_classification", ["O", "B-PER", "I-PER"])):
        impl = TASKS.get(kind)
        tasks[name] = impl(name, from_dict(impl.config_class, {"type": kind, "labels": labels}))
        tasks[name].setup([])
    cfg = from_dict(AdapterConfig, {"method": method, "arrangement": arrangement, "num_virtual_tokens": 4,
                                    **extra} if method in ("prefix", "prompt")
                    else {"method": method, "arrangement": arrangement, **extra}, "adapters")
    torch.manual_seed(0)
    return MultiTaskModel(backbone, tasks, tok, adapters=cfg), tok


def _batches(model, tok):
    sent, ner = model.tasks["sentiment"], model.tasks["ner"]
    s = sent.collate(sent.encode([{"text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(TEXTS)],
                                 tok, 16), tok.pad_token_id)
    n = ner.collate(ner.encode([{"tokens": t.split(), "tags": ["B-PER"] + ["O"] * (len(t.split()) - 1)}
                                for t in TEXTS], tok, 16), tok.pad_token_id)
    return {"sentiment": s, "ner": n}


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_only_the_intended_parameters_train(tiny_backbone, method, arrangement):
    model, tok = _model(tiny_backbone, method, arrangement)
    model.backbone.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = _batches(model, tok)
    for step in range(4):
        name = ["sentiment", "ner"][step % 2]
        model(name, batches[name]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert not {n for n in changed if n.startswith("backbone.")}, "the frozen backbone moved"
    assert {n.split(".")[1] for n in changed if n.startswith("heads.")} == {"sentiment", "ner"}
    names = ["sentiment", "ner"] if arrangement == "per_task" else ["shared"]
    for name in names:  # every adapter of the run really trains
        assert any(n.startswith(f"adapters.adapters.{name}.") for n in changed), f"adapter {name} did not train"
    assert all(n.startswith(("heads.", "adapters.")) for n in changed)
    if arrangement == "shared_conditioned":
        assert "adapters.task_embeddings" in changed


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_mixed_task_batch_equals_one_task_at_a_time(tiny_backbone, method):
    model, tok = _model(tiny_backbone, method, "per_task")
    with torch.no_grad():  # trained-looking adapters, so that routing to the wrong one would show
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    requests = [("sentiment", "a fine film"), ("ner", "anna visited oslo"), ("sentiment", "a dull film indeed"),
                ("ner", "boris left")]
    mixed = model.predict_mixed(requests)
    alone = [model.predict(t, [x])[0] for t, x in requests]
    for m, a in zip(mixed, alone):
        if "scores" in a:
            assert m["label"] == a["label"]
            assert m["scores"] == pytest.approx(a["scores"], abs=1e-5)
        else:
            assert m == a
    # the adapters matter: the plain backbone gives other scores
    with model.adapters.route(None):
        plain = model.tasks["sentiment"].infer(model, model.heads["sentiment"], _batches(model, tok)["sentiment"])
    routed = model.infer("sentiment", _batches(model, tok)["sentiment"])
    assert not torch.allclose(plain.outputs["logits"], routed.outputs["logits"])


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt", "prefix"])
def test_peft_format_round_trip(tiny_backbone, method, tmp_path):
    import peft
    from transformers import AutoModel

    model, tok = _model(tiny_backbone, method, "per_task")
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    model.adapters.export_peft(model.backbone, "ner", tmp_path / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (tmp_path / "peft").iterdir()}
    loaded = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone), tmp_path / "peft").eval()
    batch = _batches(model, tok)["ner"]
    with torch.no_grad(), model.route("ner"):
        ours = model.encode(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    if method == "prompt":  # PEFT keeps the virtual positions in its output
        theirs = theirs[:, 4:]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_config_errors():
    def cfg(**kw):
        return from_dict(AdapterConfig, kw, "adapters").resolve(METHODS, "adapters")

    with pytest.raises(ConfigError, match=r"adapters.num_virtual_tokens: only for method prefix / prompt"):
        cfg(method="lora", num_virtual_tokens=8)
    with pytest.raises(ConfigError, match=r"adapters.r: only for method dora / lora"):
        cfg(method="bottleneck", r=4)
    with pytest.raises(ConfigError, match="adapters.method: unknown|adapters.method"):
        cfg(method="lorra")
    assert cfg(method="bottleneck").reduction_factor == 16 and cfg(method="lora").r == 8
    with pytest.raises(ConfigError, match=r"adapters.rank: unknown key.*valid keys for method lora: .*\br\b"):
        cfg(method="lora", rank=4)
    with pytest.raises(ConfigError, match=r"adapters.placement: got 'middle'; expected one of: houlsby, pfeiffer"):
        cfg(method="bottleneck", placement="middle")


@pytest.mark.parametrize("name", METHODS.names())
def test_method_config_contract(name):
    """Every registered method types its own keys with its config class: the defaults fill in, its keys read
    through the section, and a key of another method is refused with the field path and the methods that
    accept it."""
    impl = METHODS.get(name)
    own = [f.name for f in dataclasses.fields(impl.config_class)]
    defaults = {f.name: f.default for f in dataclasses.fields(impl.config_class)}
    assert all(f.default is not dataclasses.MISSING and f.metadata.get("help")
               for f in dataclasses.fields(impl.config_class)), "every key has a default and a help text"
    config = from_dict(AdapterConfig, {"method": name}, "adapters").resolve(METHODS, "adapters")
    assert isinstance(config.options, impl.config_class) and to_dict(config.options) == defaults
    assert all(getattr(config, key) == value for key, value in defaults.items())
    # the saved form is flat, every method's keys present (null for the other methods'), and reads back equal
    saved = to_dict(config)
    every = {f.name for m in METHODS.names() for f in dataclasses.fields(METHODS.get(m).config_class)}
    assert every <= set(saved) and all(saved[k] is None for k in every - set(own))
    again = from_dict(AdapterConfig, saved, "adapters").resolve(METHODS, "adapters")
    assert to_dict(again) == saved
    for key in sorted(every - set(own)):
        users = [m for m in METHODS.names() if key in {f.name for f in dataclasses.fields(METHODS.get(m).config_class)}]
        with pytest.raises(ConfigError, match=rf"^adapters\.{key}: only for method {' / '.join(users)}, not '{name}'"):
            from_dict(AdapterConfig, {"method": name, key: 1}, "adapters").resolve(METHODS, "adapters")
    # fusion asks the method's declared capability
    fusion = from_dict(AdapterConfig, {"method": name, "arrangement": "fusion"}, "adapters")
    if impl.fusable:
        fusion.resolve(METHODS, "adapters")
    else:
        with pytest.raises(ConfigError, match=r"^adapters\.arrangement: fusion attends over"):
            fusion.resolve(METHODS, "adapters")


def test_run_config_errors(toy_data, tiny_backbone, tmp_path):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run")
    raw["adapters"] = {"method": "lora"}
    raw["training"]["layer_lr_decay"] = 0.9
    with pytest.raises(ConfigError, match="training.layer_lr_decay: not with adapters"):
        parse_config(raw)
    raw["training"].pop("layer_lr_decay")
    raw["adapters"] = {"method": "lora", "target_modules": ["nothing_like_this"]}
    parse_config(raw)  # target modules are checked against the backbone when the model is built
    with pytest.raises(ConfigError, match="adapters.target_modules: no linear layer .* matches"):
        train(parse_config(raw), progress=False)
    raw["adapters"] = {"method": "lora", "arrangement": "fusion"}
    with pytest.raises(ConfigError, match="adapters.arrangement: fusion attends over .* set method: bottleneck"):
        parse_config(raw)
    raw["adapters"] = {"method": "bottleneck", "arrangement": "fusion", "fusion_targets": ["sentimnt"]}
    with pytest.raises(ConfigError, match="adapters.fusion_targets: no task 'sentimnt'"):
        parse_config(raw)
    raw["adapters"] = {"method": "bottleneck", "fusion_steps": 4}
    with pytest.raises(ConfigError, match="adapters.fusion_steps: only for arrangement fusion"):
        parse_config(raw)


@pytest.mark.parametrize("method,arrangement", [("lora", "per_task"), ("bottleneck", "shared_conditioned"),
                                                ("prompt", "shared")])
def test_train_save_reload_predict(toy_data, tiny_backbone, tmp_path, method, arrangement):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", learning_rate=5e-3)
    raw["tasks"].pop("mlm")
    raw["adapters"] = {"method": method, "arrangement": arrangement}
    results = train(parse_config(raw), progress=False)
    assert set(results["adapters"]["bytes_per_task"]) == {"sentiment", "ner", "similarity"}
    table = json.loads((tmp_path / "run" / "parameters.json").read_text())
    backbone_rows = [r for r in table if r["group"].startswith("backbone/")]
    assert backbone_rows and all(r["trainable"] == 0 for r in backbone_rows)
    assert any(r["group"].startswith("adapters") and r["trainable"] > 0 for r in table)
    # adapters train at their method's own rate, not at the backbone's learning_rate
    rates = {r["lr"] for r in table if r["group"].startswith("adapters") and r["trainable"]}
    assert rates == {METHODS.get(method).default_learning_rate} and 5e-3 not in rates
    # and the heads on the frozen backbone at the larger default for adapter runs
    assert {r["lr"] for r in table if r["group"].startswith("heads/")} == {ADAPTER_HEAD_LEARNING_RATE}
    # the saved backbone is the untouched pretrained one; adapters sit in their own file
    saved = load_file(str(tmp_path / "run" / "model" / "backbone" / "model.safetensors"))
    original = load_file(f"{tiny_backbone}/model.safetensors")
    assert all(torch.equal(saved[k], original[k]) for k in original)
    model = MultiTaskModel.load(tmp_path / "run")
    again = MultiTaskModel.load(tmp_path / "run")
    texts = ["the film was great", "the meal was awful"]
    assert model.predict("sentiment", texts) == again.predict("sentiment", texts)
    with torch.no_grad():
        for p in again.adapters.parameters():
            p.zero_()
    assert model.predict("similarity", [("a", "b")]) != again.predict("similarity", [("a", "b")])


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_export_merge_matches_the_unmerged_model(toy_data, tiny_backbone, tmp_path, method, capsys):
    from transformers import AutoModel

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", learning_rate=1e-2, max_steps=4)
    raw["tasks"] = {k: raw["tasks"][k] for k in ("sentiment", "ner")}
    raw["adapters"] = {"method": method}
    train(parse_config(raw), progress=False)
    assert main(["export", str(tmp_path / "run"), "--task", "ner", "--merge", "--output", str(tmp_path / "m")]) == 0
    assert main(["export", str(tmp_path / "run"), "--task", "ner", "--output", str(tmp_path / "a")]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert reports[1]["bytes"] > 0 and "adapter_model.safetensors" in reports[1]["files"]
    model = MultiTaskModel.load(tmp_path / "run")
    merged = MultiTaskModel.load(tmp_path / "m")
    assert merged.adapters is None and list(merged.tasks) == ["ner"]
    texts = ["anna visited oslo today", "yesterday boris left"]
    assert merged.predict("ner", texts) == model.predict("ner", texts)
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    plain = AutoModel.from_pretrained(tmp_path / "m").eval()  # a plain transformers directory
    with torch.no_grad(), model.route("ner"):
        ours = model.encode(enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():
        theirs = plain(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    # an existing export is not replaced without --overwrite
    assert main(["export", str(tmp_path / "run"), "--task", "ner", "--merge", "--output", str(tmp_path / "m")]) == 2


def test_bottleneck_does_not_merge(toy_data, tiny_backbone, tmp_path, capsys):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=2, eval_every=2)
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    raw["adapters"] = {"method": "bottleneck", "placement": "houlsby"}
    train(parse_config(raw), progress=False)
    assert main(["export", str(tmp_path / "run"), "--task", "sentiment", "--merge", "--output",
                 str(tmp_path / "m")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["export", str(tmp_path / "run"), "--task", "sentiment", "--output", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("family,method", [("tiny_t5", "lora"), ("tiny_llama", "lora"), ("tiny_t5", "prompt"),
                                           ("tiny_llama", "bottleneck")])
def test_adapters_on_generative_families(family, method, request, toy_data, tmp_path):
    backbone = request.getfixturevalue(family)
    raw = text2text_config(toy_data, backbone, tmp_path / "run", tasks=("sentiment", "sentiment_text"),
                           max_steps=4, eval_every=4)
    raw["adapters"] = {"method": method, **({"num_virtual_tokens": 4} if method == "prompt" else {})}
    train(parse_config(raw), progress=False)
    model = MultiTaskModel.load(tmp_path / "run")
    out = model.predict("sentiment_text", ["the film was great"])
    assert isinstance(out[0]["text"], str)
    mixed = model.predict_mixed([("sentiment", "the film was great"), ("sentiment_text", "the film was great")])
    assert mixed[0]["label"] == model.predict("sentiment", ["the film was great"])[0]["label"]
    assert mixed[1] == out[0]


def test_prefix_refuses_a_decoder(tiny_llama, toy_data, tmp_path):
    raw = text2text_config(toy_data, tiny_llama, tmp_path / "run", tasks=("sentiment_text",))
    raw["adapters"] = {"method": "prefix"}
    with pytest.raises(ConfigError, match="adapters.method: prefix supports encoder backbones, not decoder_only"):
        train(parse_config(raw), progress=False)


def test_fusion_layer_starts_as_the_mean_of_adapter_outputs_and_attends():
    from multitune.adapters.fusion import AdapterFusionLayer

    torch.manual_seed(0)
    layer = AdapterFusionLayer(8)
    h = torch.randn(2, 3, 8)
    outputs = torch.stack([h + 1.0, h - 1.0, h + 3.0])  # three adapters' outputs
    with torch.no_grad():
        layer.query.weight.zero_()  # no query: uniform attention
        fused, attention = layer(h, outputs)
    torch.testing.assert_close(attention, torch.full((2, 3, 3), 1 / 3))
    torch.testing.assert_close(fused, h + 1.0)  # identity values: the mean of the outputs
    with torch.no_grad():  # a query/key pair that prefers the third adapter's direction
        layer.query.weight.copy_(torch.eye(8) * 10)
        layer.key.weight.copy_(torch.eye(8))
        layer.key.bias.copy_(torch.tensor([0.0] * 7 + [0.0]))
        fused, attention = layer(torch.ones(1, 1, 8), torch.stack([torch.full((1, 1, 8), v) for v in (1.0, -1.0, 3.0)]))
    assert attention[0, 0].argmax() == 2 and attention[0, 0, 2] > 0.99
    torch.testing.assert_close(fused, torch.full((1, 1, 8), 3.0), atol=1e-3, rtol=0)


def _fusion_model(backbone_dir, targets=None):
    model, tok = _model(backbone_dir, "bottleneck", "fusion", **({"fusion_targets": targets} if targets else {}))
    with torch.no_grad():  # trained-looking adapters
        for p in model.adapters.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model, tok


def test_fusion_trains_only_fusion_layers_and_target_heads(tiny_backbone):
    model, tok = _fusion_model(tiny_backbone, ["sentiment"])
    model.backbone.requires_grad_(False)
    model.adapters.adapters.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batches(model, tok)["sentiment"]
    for _ in range(3):
        model("sentiment", batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any(n.startswith("adapters.fusion.sentiment.") for n in changed)
    assert all(n.startswith(("adapters.fusion.sentiment.", "heads.sentiment.")) for n in changed), changed
    # a non-target task runs through its own adapter only, exactly as before fusion
    ner = _batches(model, tok)["ner"]
    with torch.no_grad(), model.route("ner"):
        fused_run = model.encode(ner["input_ids"], ner["attention_mask"])
    plain = MultiTaskModel(model.backbone, model.tasks, tok, adapters=from_dict(
        AdapterConfig, {"method": "bottleneck", "arrangement": "per_task"}, "adapters"))
    model.adapters.remove_hooks()
    plain.adapters.adapters.load_state_dict(model.adapters.adapters.state_dict())
    with torch.no_grad(), plain.route("ner"):
        own = plain.encode(ner["input_ids"], ner["attention_mask"])
    torch.testing.assert_close(fused_run, own)


def test_fusion_mixed_batch_equals_one_task_at_a_time(tiny_backbone):
    model, _ = _fusion_model(tiny_backbone, ["sentiment"])
    with torch.no_grad():
        for p in model.adapters.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    requests = [("sentiment", "a fine film"), ("ner", "anna visited oslo"), ("sentiment", "a dull film indeed")]
    mixed = model.predict_mixed(requests)
    alone = [model.predict(t, [x])[0] for t, x in requests]
    for m, a in zip(mixed, alone):
        if "scores" in a:
            assert m["scores"] == pytest.approx(a["scores"], abs=1e-5)
        else:
            assert m == a
    attention = model.adapters.fusion_attention()
    assert set(attention) == {"sentiment"} and set(attention["sentiment"]) == {"sentiment", "ner"}
    assert sum(attention["sentiment"].values()) == pytest.approx(1.0, abs=1e-3)


def test_fusion_run_trains_adapters_then_fusion(toy_data, tiny_backbone, tmp_path, capsys):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", learning_rate=5e-3, max_steps=4, eval_every=4)
    raw["tasks"] = {k: raw["tasks"][k] for k in ("sentiment", "ner", "similarity")}
    raw["adapters"] = {"method": "bottleneck", "arrangement": "fusion", "fusion_targets": ["sentiment"],
                       "fusion_steps": 3, "fusion_learning_rate": 1e-2}
    results = train(parse_config(raw), progress=False)
    run = tmp_path / "run"
    assert [s["stage"] for s in results["stages"]] == ["adapters", "fusion"]
    assert results["stages"][1]["train"]["steps"] == 3
    assert set(results["forgetting"]["matrix"]["sentiment"]) == {"adapters", "fusion"}
    # stage 2 moved only the fusion layers and the target's head; every task adapter is as stage 1 left it
    first = load_file(str(run / "stages/01-adapters/model/adapters.safetensors"))
    second = load_file(str(run / "model/adapters.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(k.startswith("fusion.sentiment.") for k in second)
    h1 = load_file(str(run / "stages/01-adapters/model/heads.safetensors"))
    h2 = load_file(str(run / "model/heads.safetensors"))
    assert not all(torch.equal(h1[k], h2[k]) for k in h1 if k.startswith("sentiment."))
    assert all(torch.equal(h1[k], h2[k]) for k in h1 if not k.startswith("sentiment."))
    table = json.loads((run / "stages/02-fusion/parameters.json").read_text())
    assert any(r["group"].startswith("fusion") and r["trainable"] > 0 for r in table)
    assert all(r["trainable"] == 0 for r in table if r["group"].startswith("adapters/"))
    assert set(results["adapters"]["fusion_attention"]["sentiment"]) == {"sentiment", "ner", "similarity"}
    bytes_ = results["adapters"]["bytes_per_task"]
    assert bytes_["sentiment"] > bytes_["ner"] == bytes_["similarity"]
    # the run reloads as one model; a fusion target has no single-adapter export
    model = MultiTaskModel.load(run)
    assert model.adapters.fusion_targets == ["sentiment"]
    assert model.predict("sentiment", ["a fine film"]) == MultiTaskModel.load(run).predict("sentiment", ["a fine film"])
    assert main(["export", str(run), "--task", "sentiment", "--output", str(tmp_path / "e")]) == 2
    assert "AdapterFusion" in capsys.readouterr().err
    # --resume of a finished fusion run skips both stages
    again = train(parse_config(raw), resume=True, progress=False)
    assert again["validation"] == results["validation"]
