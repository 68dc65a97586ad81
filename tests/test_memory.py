"""Gradient checkpointing (training.gradient_checkpointing): the same loss and gradients with and without it on
tiny BERT, T5 and LLaMA-like models, with LoRA adapters, on the unpadded path and compiled; layers really are
recomputed; prefix tuning is refused; a training run turns it on and reports its peak memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from multitune import Callback
from multitune.adapters import AdapterSet
from multitune.backbones.architectures import architecture_for
from multitune.backbones.unpadded import unpadded_hidden_states, unpadded_support
from multitune.config import parse_config
from multitune.config.adapters import AdapterConfig
from multitune.errors import ConfigError
from multitune.training import train
from multitune.training.hardware import peak_memory
from multitune.training.setup import apply_gradient_checkpointing
from tests.conftest import toy_config

NO_DROPOUT = {"bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
              "t5": {"dropout_rate": 0.0}, "llama": {"attention_dropout": 0.0}}


def _batch(tokenizer, texts=("the film was wonderful and long", "dull", "a fine meal near the station")):
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _loss(family: str, model, ids, mask) -> torch.Tensor:
    if family == "bert":
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return (states.pow(2).mean(-1) * mask).sum() / mask.sum()
    labels = ids.masked_fill(mask == 0, -100)
    if family == "t5":
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


def _count_calls(module) -> list[int]:
    """A counter of ``module``'s calls (in a checkpointed layer, a module runs again in the backward pass)."""
    calls = [0]
    module.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def _recomputes(model) -> list[int]:
    """A counter of calls of the first layer's attention module."""
    return _count_calls(next(m for n, m in model.named_modules()
                             if n.endswith(("layer.0.attention", "layers.0.self_attn", "block.0.layer.0"))))


@pytest.mark.parametrize(("family", "fixture", "auto"), [("bert", "tiny_backbone", AutoModel),
                                                         ("t5", "tiny_t5", AutoModelForSeq2SeqLM),
                                                         ("llama", "tiny_llama", AutoModelForCausalLM)])
def test_checkpointing_gives_the_same_loss_and_gradients(request, family, fixture, auto):
    path = request.getfixturevalue(fixture)
    ids, mask = _batch(AutoTokenizer.from_pretrained(path))
    results = {}
    for checkpointed in (False, True):
        model = auto.from_pretrained(path, **NO_DROPOUT[family]).train()
        if checkpointed:
            apply_gradient_checkpointing(model)
        calls = _recomputes(model)
        loss = _loss(family, model, ids, mask)
        loss.backward()
        results[checkpointed] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                                 if p.grad is not None}, calls[0])
    (plain, plain_grads, plain_calls), (ckpt, ckpt_grads, ckpt_calls) = results[False], results[True]
    assert (plain_calls, ckpt_calls) == (1, 2)  # the checkpointed layer ran again in the backward pass
    assert torch.allclose(plain, ckpt, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        assert torch.allclose(g, ckpt_grads[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize(("fixture", "auto", "unpadded"), [("tiny_llama", AutoModelForCausalLM, False),
                                                          ("tiny_backbone", AutoModel, True)])
def test_checkpointing_with_lora_on_a_frozen_backbone(request, fixture, auto, unpadded):
    """The backward pass (and so the recomputation) runs after the adapter routing block has ended, as in the
    training loop: the recomputed layers must still go through the adapters."""
    path = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(path)
    ids, mask = _batch(tok)
    grads = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = auto.from_pretrained(path, **NO_DROPOUT["llama" if unpadded is False else "bert"]).train()
        config = AdapterConfig(method="lora", arrangement="shared", options={"dropout": 0.0})
        adapters = AdapterSet(config, model, architecture_for(model, tok), ["t"])
        model.requires_grad_(False)  # as training freezes the backbone under adapters
        if checkpointed:
            apply_gradient_checkpointing(model, adapters)
        torch.nn.init.normal_(adapters.adapters["shared"]["s0"].lora_B)  # B starts at 0: make it matter
        with adapters.route("t"):
            if unpadded:
                states = unpadded_hidden_states(model, ids, mask)
                loss = (states.pow(2).mean(-1) * mask).sum() / mask.sum()
            else:
                loss = _loss("llama", model, ids, mask)
        loss.backward()
        grads[checkpointed] = {n: p.grad for n, p in adapters.named_parameters() if p.grad is not None}
    assert grads[False] and grads[False].keys() == grads[True].keys()
    assert not any(p.grad is not None for p in model.parameters())  # the frozen base gets none
    for name, g in grads[False].items():
        assert torch.allclose(g, grads[True][name], atol=1e-6, rtol=1e-5), name


def test_unpadded_path_checkpoints_its_layers(tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    ids, mask = _batch(tok)
    results = {}
    for checkpointed in (False, True):
        model = AutoModel.from_pretrained(tiny_backbone, **NO_DROPOUT["bert"]).train()
        if checkpointed:
            apply_gradient_checkpointing(model)
        assert unpadded_support(model) is None  # no fallback to the padded path
        calls = _count_calls(model.encoder.layer[0].intermediate)
        states = unpadded_hidden_states(model, ids, mask)
        loss = (states.pow(2).mean(-1) * mask).sum() / mask.sum()
        loss.backward()
        results[checkpointed] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                                 if p.grad is not None}, calls[0])
    assert (results[False][2], results[True][2]) == (1, 2)
    assert torch.allclose(results[False][0], results[True][0], atol=1e-6)
    for name, g in results[False][1].items():
        assert torch.allclose(g, results[True][1][name], atol=1e-6, rtol=1e-5), name


def test_checkpointing_under_torch_compile(tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    ids, mask = _batch(tok)
    losses, grads = [], []
    for checkpointed in (False, True):
        model = AutoModel.from_pretrained(tiny_backbone, **NO_DROPOUT["bert"]).train()
        if checkpointed:
            apply_gradient_checkpointing(model)
            model.compile(dynamic=True, backend="aot_eager")  # as training.compile, on a quick backend
        loss = _loss("bert", model, ids, mask)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.encoder.layer[0].attention.self.query.weight.grad)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_prefix_tuning_with_checkpointing_is_refused(tiny_backbone):
    model = AutoModel.from_pretrained(tiny_backbone)
    adapters = SimpleNamespace(method=SimpleNamespace(feeds_cache=True), config=SimpleNamespace(method="prefix"))
    with pytest.raises(ConfigError, match=r"^training\.gradient_checkpointing: not with adapters\.method prefix"):
        apply_gradient_checkpointing(model, adapters)


def test_a_run_trains_with_checkpointing(tmp_path, toy_data, tiny_backbone):
    seen = []

    class Look(Callback):
        def on_run_start(self, run):
            seen.append(all(layer.gradient_checkpointing for layer in run.core.backbone.encoder.layer))

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", gradient_checkpointing=True, max_steps=2,
                     eval_every=2)
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    results = train(parse_config(raw), progress=False, callbacks=[Look()])
    assert seen == [True] and results["train"]["steps"] == 2
    # the process's peak resident memory up to the end of training, as the kernel counts it (VmHWM)
    assert 0.1 < results["train"]["peak_rss_gb"] <= _status_gb("VmHWM") + 1e-3
    assert "peak_device_memory_gb" not in results["train"]  # a CPU run has no device memory to report


def _status_gb(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024 ** 2


def test_peak_memory_is_the_processes_peak_resident_set_in_gb():
    held = torch.ones(300 * 1024 ** 2 // 4)  # 300 MB, touched, resident now
    peak = peak_memory("cpu")["peak_rss_gb"]
    assert _status_gb("VmRSS") - 1e-3 <= peak <= _status_gb("VmHWM") + 1e-3
    assert peak > held.numel() * 4 / 1024 ** 3
