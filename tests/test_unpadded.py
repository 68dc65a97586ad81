"""Unpadded encoder execution (``training.unpadded``): the same states and gradients as the padded path on
BERT-layout families, adapters that hook the backbone's modules included; the padded path, with the reason,
where it would not be exact; a tiny training run."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from multitune.adapters import AdapterConfig
from multitune.backbones import unpadded
from multitune.backbones.architectures import EncoderArchitecture
from multitune.backbones.unpadded import unpadded_hidden_states, unpadded_support
from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.errors import ConfigError
from multitune.model import MultiTaskModel
from multitune.tasks import TASKS
from multitune.training import train
from tests.conftest import toy_config

VOCAB = 120
LENGTHS = [11, 3, 7, 1, 9]  # the first row is the batch's full width


def _encoder(family: str = "bert", attention: str = "eager", dropout: float = 0.0, **extra):
    from transformers import BertConfig, BertModel, ElectraConfig, ElectraModel, RobertaConfig, RobertaModel

    kinds = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel),
             "electra": (ElectraConfig, ElectraModel)}
    config_class, model_class = kinds[family]
    settings = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
                "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout, **extra}
    if family == "roberta":
        settings["pad_token_id"] = 1  # positions start after the pad id, and count non-pad tokens
    if family == "electra":
        settings["embedding_size"] = 16  # an embeddings_project layer between embeddings and encoder
    torch.manual_seed(0)
    model = model_class(config_class(**settings))
    model.set_attn_implementation(attention)
    return model


def _batch(pad_id: int, lengths=LENGTHS, pairs: bool = True, left: bool = False):
    """Random ids padded to the longest row; with ``pairs``, the second half of each row is segment 1."""
    gen = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=gen)
    slots = torch.arange(width)[None]
    n = torch.tensor(lengths)[:, None]
    mask = (slots >= width - n) if left else (slots < n)
    first = (width - n if left else 0) + n // 2
    types = ((slots >= first) & mask).long() if pairs else None
    return ids.masked_fill(~mask, pad_id), mask.long(), types


def _padded(model, ids, mask, types):
    return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_states_equal_the_padded_path_at_real_positions(family, attention):
    model = _encoder(family, attention).eval()
    assert unpadded_support(model) is None
    pad = model.config.pad_token_id
    for ids, mask, types in (_batch(pad), _batch(pad, pairs=False), _batch(pad, left=True),
                             _batch(pad, lengths=[6, 6, 6])):  # pairs, single texts, left padding, no padding
        with torch.no_grad():
            expected, got = _padded(model, ids, mask, types), unpadded_hidden_states(model, ids, mask, types)
        real = mask.bool()
        assert got.shape == expected.shape
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
        assert not got[~real].any()  # zeros where the padded path has states of padding


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_rows_in_several_length_buckets(attention, monkeypatch):
    monkeypatch.setattr(unpadded, "BUCKET_COST", 0)  # a bucket whenever it saves any attention work
    model = _encoder("roberta", attention).eval()
    lengths = [3, 12, 0, 12, 5, 1, 9]  # two full rows, not first; a row without tokens
    assert len(unpadded._buckets(lengths)) > 2
    for left in (False, True):
        ids, mask, types = _batch(1, lengths=lengths, left=left)
        with torch.no_grad():
            expected, got = _padded(model, ids, mask, types), unpadded_hidden_states(model, ids, mask, types)
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
        assert not got[~real].any()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("bucket_cost", [unpadded.BUCKET_COST, 0], ids=["default-buckets", "many-buckets"])
def test_gradients_equal_the_padded_path(family, mode, bucket_cost, monkeypatch):
    monkeypatch.setattr(unpadded, "BUCKET_COST", bucket_cost)
    model = _encoder(family, dropout=0.0)
    getattr(model, mode)()
    ids, mask, types = _batch(model.config.pad_token_id)
    weight = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(2)) * mask[..., None]

    def grads(states):
        model.zero_grad(set_to_none=True)
        (states * weight).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads(_padded(model, ids, mask, types))
    got = grads(unpadded_hidden_states(model, ids, mask, types))
    assert expected.keys() - got.keys() <= {n for n in expected if n.startswith("pooler.")}
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_acts_in_training_mode():
    model = _encoder(dropout=0.3).train()
    ids, mask, types = _batch(0)
    a, b = (unpadded_hidden_states(model, ids, mask, types) for _ in range(2))
    assert not torch.equal(a, b)
    model.eval()
    a, b = (unpadded_hidden_states(model, ids, mask, types) for _ in range(2))
    assert torch.equal(a, b)


def test_bf16_autocast_stays_close_to_the_padded_path():
    model = _encoder().train()
    ids, mask, types = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = _padded(model, ids, mask, types), unpadded_hidden_states(model, ids, mask, types)
    assert got.dtype == expected.dtype
    real = mask.bool()
    torch.testing.assert_close(got[real].float(), expected[real].float(), atol=0.05, rtol=0.05)


def _tasks():
    tasks = {}
    for name, kind, extra in (("sentiment", "classification", {"labels": ["neg", "pos"]}),
                              ("ner", "token_classification", {"labels": ["O", "B-PER", "I-PER"]}),
                              ("similarity", "regression", {"label_range": [0, 5]})):
        impl = TASKS.get(kind)
        tasks[name] = impl(name, from_dict(impl.config_class, {"type": kind, **extra}))
        tasks[name].setup([])
    return tasks


def _model(tokenizer, adapters: dict | None = None) -> MultiTaskModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    backbone = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    backbone.set_attn_implementation("eager")
    cfg = None if adapters is None else from_dict(AdapterConfig, adapters, "adapters")
    model = MultiTaskModel(backbone, _tasks(), tokenizer, max_length=32, adapters=cfg)
    with torch.no_grad():  # trained-looking adapters, so that an adapter the path skipped would show
        for name, p in model.named_parameters():
            if name.startswith("adapters.") and ("lora_B" in name or ".up." in name or "task_embeddings" in name):
                p.normal_(0, 0.5)
            elif name.startswith("adapters.") and "ia3_l" in name:
                p.uniform_(0.5, 1.5)
    return model


def _task_batches(model, tokenizer):
    texts = ["anna visited oslo yesterday with boris", "a fine film", "boris left lima", "dull"]
    sent, ner, sim = (model.tasks[n] for n in ("sentiment", "ner", "similarity"))
    return {
        "sentiment": sent.collate(sent.encode([{"text": t, "label": "pos"} for t in texts], tokenizer, 32), 0),
        "ner": ner.collate(ner.encode([{"tokens": t.split(), "tags": ["B-PER"] + ["O"] * (len(t.split()) - 1)}
                                       for t in texts], tokenizer, 32), 0),
        "similarity": sim.collate(sim.encode([{"text": t, "text_pair": texts[-1 - i], "label": 2.5}
                                              for i, t in enumerate(texts)], tokenizer, 32), 0)}


def _count_unpadded_calls(monkeypatch) -> list:
    import multitune.backbones.architectures as arch

    calls: list = []
    monkeypatch.setattr(arch, "unpadded_hidden_states", lambda *a: calls.append(1) or unpadded_hidden_states(*a))
    return calls


def _losses_and_grads(model, batches):
    out = {}
    for task, batch in batches.items():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the heads' dropout draws the same masks on both paths
        loss = model(task, batch).loss
        loss.backward()
        out[task] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


@pytest.mark.parametrize("adapters", [
    None,
    {"method": "lora", "dropout": 0.0, "target_modules": ["query", "value", "dense"]},
    {"method": "dora", "dropout": 0.0},
    {"method": "ia3"},
    {"method": "bottleneck", "placement": "houlsby"},
    {"method": "lora", "dropout": 0.0, "arrangement": "shared_conditioned"},
], ids=["plain", "lora", "dora", "ia3", "bottleneck", "lora-task-embedding"])
def test_task_losses_and_gradients_equal_with_adapters(tokenizer, adapters, monkeypatch):
    model = _model(tokenizer, adapters).train()
    assert unpadded_support(model) is None
    batches = _task_batches(model, tokenizer)
    assert batches["similarity"]["token_type_ids"].any()  # pair inputs
    expected = _losses_and_grads(model, batches)
    calls = _count_unpadded_calls(monkeypatch)
    model.unpadded = True
    got = _losses_and_grads(model, batches)
    assert len(calls) == len(batches)
    for task, (loss, grads) in got.items():
        torch.testing.assert_close(loss, expected[task][0], atol=1e-5, rtol=1e-5)
        assert grads.keys() == expected[task][1].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[task][1][name], atol=1e-5, rtol=1e-4, msg=f"{task}: {name}")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_soft_prompts_fall_back_to_the_padded_path_and_say_why(tokenizer, method):
    model = _model(tokenizer, {"method": method, "num_virtual_tokens": 3}).eval()
    reason = unpadded_support(model)
    assert reason is not None and "the token model has a forward pre-hook" in reason
    batch = _task_batches(model, tokenizer)["ner"]
    with torch.no_grad():
        expected = model.infer("ner", batch).outputs["logits"]
        model.unpadded = True
        with pytest.warns(UserWarning, match="runs padded: the token model has a forward pre-hook"):
            got = model.infer("ner", batch).outputs["logits"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # decided once per model: no second warning
            again = model.infer("ner", batch).outputs["logits"]
    assert torch.equal(got, expected) and torch.equal(again, expected)


def test_mixed_task_batch_runs_padded(tokenizer):
    model = _model(tokenizer, {"method": "lora", "dropout": 0.0}).eval()
    expected = model.predict_mixed([("sentiment", "a fine film"), ("ner", "anna visited oslo")])
    model.unpadded = True
    assert model.predict_mixed([("sentiment", "a fine film"), ("ner", "anna visited oslo")]) == expected


def test_other_families_fall_back_and_say_why():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).eval()
    assert "does not have BERT's module layout" in unpadded_support(model)
    arch = EncoderArchitecture(SimpleNamespace(pad_token_id=0, eos_token_id=None, sep_token_id=2))
    ids, mask, _ = _batch(0, pairs=False)
    with torch.no_grad(), pytest.warns(UserWarning, match="runs padded"):
        got = arch.hidden_states(model, ids, mask, unpadded=True)
    torch.testing.assert_close(got, model(input_ids=ids, attention_mask=mask).last_hidden_state)
    decoder = _encoder(is_decoder=True)
    assert "configured as a decoder" in unpadded_support(decoder)
    checkpointed = _encoder()
    checkpointed.activation_checkpointing_enable()
    assert unpadded_support(checkpointed) is None  # the unpadded path checkpoints its own layers
    hooked = _encoder()
    hooked.encoder.layer[1].attention.register_forward_hook(lambda module, args, output: None)
    assert unpadded_support(hooked).startswith("encoder.layer.1.attention has a forward hook")


def test_config_field_and_its_conflict_with_compile(toy_data, tiny_backbone, tmp_path):
    assert parse_config(toy_config(toy_data, tiny_backbone, tmp_path / "a")).training.unpadded is False
    assert parse_config(toy_config(toy_data, tiny_backbone, tmp_path / "a", unpadded=True)).training.unpadded
    with pytest.raises(ConfigError, match="training.unpadded"):
        parse_config(toy_config(toy_data, tiny_backbone, tmp_path / "a", unpadded=True, compile=True))


def test_a_tiny_run_trains_unpadded(toy_data, tiny_backbone, tmp_path, monkeypatch):
    calls = _count_unpadded_calls(monkeypatch)
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=4, eval_every=4, unpadded=True,
                     per_task_best=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning: the tiny BERT runs unpadded
        result = train(parse_config(raw), progress=False)
    assert result["train"]["steps"] == 4 and calls  # training steps and evaluation went through the path
    for task, metrics in result["validation"].items():
        assert all(v == v for v in metrics.values() if isinstance(v, float)), task  # no NaN
