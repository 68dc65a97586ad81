"""One backbone pass over the batches of several tasks (a step of a loss weighting that takes every task with one
backward pass): the same losses and gradients as a forward pass per task; what cannot share falls back."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from multitune.backbones import load_backbone
from multitune.config import parse_config
from multitune.config.adapters import AdapterConfig
from multitune.config.parse import from_dict
from multitune.errors import MultituneError
from multitune.model import MultiTaskModel
from multitune.tasks import TASKS
from multitune.training import train
from multitune.training.multistep import MAX_EXTRA_PADDING, WeightedStep
from tests.conftest import text2text_config, toy_config

WEIGHTS = {"sentiment": 1.0, "ner": 0.5, "pair": 2.0, "bi": 1.5, "translate": 0.7}
SENTENCES = ["a fine film", "the meal near the old harbour was dull and far too long for anyone", "superb",
             "an awful trip"]
PAIRS = [("the film was great", "a film that was great fun from start to end, really"), ("dull", "boring"),
         ("the hotel was lovely", "the song was bad"), ("a great show", "the show was great")]


def task(name: str, kind: str, **config):
    impl = TASKS.get(kind)
    t = impl(name, from_dict(impl.config_class, {"type": kind, **config}))
    return t


def build(backbone_dir: str, names=("sentiment", "ner", "pair", "bi"), arrangement: str | None = None):
    """A model with the named tasks on ``backbone_dir``, every dropout 0, and one batch per task."""
    backbone, tok = load_backbone(backbone_dir)
    ner_examples = [{"tokens": s.split(), "tags": ["O"] * (len(s.split()) - 1) + ["B-LOC"]} for s in SENTENCES]
    specs = {
        "sentiment": (task("sentiment", "classification", labels=["neg", "pos"]),
                      [{"text": s, "label": "pos" if i % 2 else "neg"} for i, s in enumerate(SENTENCES)]),
        "ner": (task("ner", "token_classification"), ner_examples),
        "pair": (task("pair", "regression", label_range=[0, 5]),
                 [{"text": a, "text_pair": b, "label": float(i + 1)} for i, (a, b) in enumerate(PAIRS)]),
        "bi": (task("bi", "regression", encoder="bi", label_range=[0, 5]),
               [{"text": a, "text_pair": b, "label": float(4 - i)} for i, (a, b) in enumerate(PAIRS)]),
        "translate": (task("translate", "text2text"),
                      [{"source": s, "target": s.split()[-1]} for s in SENTENCES]),
    }
    tasks = {n: specs[n][0] for n in names}
    for n in names:
        tasks[n].setup(specs[n][1])
    adapters = None if arrangement is None else from_dict(AdapterConfig, {"method": "lora",
                                                                          "arrangement": arrangement}, "adapters")
    torch.manual_seed(0)
    model = MultiTaskModel(backbone, tasks, tok, max_length=32, adapters=adapters)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if adapters is not None:
        with torch.no_grad():  # LoRA starts as the identity; make it change the states so that routing matters
            for name, p in model.adapters.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(std=0.05)
    batches = {}
    for n in names:
        feats = tasks[n].encode(specs[n][1], tok, 32)
        batches[n] = tasks[n].collate(feats, tok.pad_token_id, torch.Generator().manual_seed(0))
    return model, batches


def step_for(model: MultiTaskModel, max_extra_padding: float = math.inf) -> WeightedStep:
    """A :class:`WeightedStep` whose part is every task, with one backward pass (as GradNorm's and FAMO's); by
    default it shares a pass whatever padding that adds."""
    every = SimpleNamespace(needs_all_tasks=True, needs_per_task_gradients=False, needs_shared_layer=False,
                            needs_losses_after_step=False, config=None)
    sampler = SimpleNamespace(probabilities=lambda: dict.fromkeys(model.tasks, 1.0))
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), backward=lambda loss: loss.backward())
    step = WeightedStep(every, sampler, model, model, [p for p in model.parameters() if p.requires_grad],
                        accelerator)
    step.max_extra_padding = max_extra_padding
    return step


def losses_and_grads(model: MultiTaskModel, compute) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    losses = compute()
    sum(WEIGHTS[n] * loss for n, loss in losses.items()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {n: v.detach() for n, v in losses.items()}, grads


class BackboneCalls:
    """Counts the passes of the module that computes the token states (an encoder-decoder's encoder)."""

    def __init__(self, model: MultiTaskModel):
        self.n = 0
        self.handle = model.architecture.token_model(model.backbone).register_forward_pre_hook(self.count)

    def count(self, *_):
        self.n += 1


def assert_same(model, batches, step, expected_passes: int):
    per_task, per_task_grads = losses_and_grads(model, lambda: {n: model(n, b).loss for n, b in batches.items()})
    calls = BackboneCalls(model)
    shared, shared_grads = losses_and_grads(model, lambda: step.losses(batches))
    calls.handle.remove()
    assert calls.n == expected_passes
    assert list(shared) == list(batches)
    assert_close_results(shared, shared_grads, per_task, per_task_grads)


def assert_close_results(shared, shared_grads, per_task, per_task_grads):
    """The losses and every parameter's gradient of a shared pass equal those of a pass per task."""
    for n in per_task:
        assert torch.allclose(shared[n], per_task[n], rtol=1e-5, atol=1e-6), (n, shared[n], per_task[n])
    assert shared_grads.keys() == per_task_grads.keys()
    for n, g in per_task_grads.items():
        assert torch.allclose(shared_grads[n], g, rtol=1e-4, atol=1e-6), (n, (shared_grads[n] - g).abs().max())


def test_one_pass_gives_the_losses_and_gradients_of_a_pass_per_task(tiny_backbone):
    """Classification, token classification, a cross-encoder on pairs and a bi-encoder (two encode calls), with
    inputs of different lengths: one backbone pass, and the losses and every parameter's gradient of the
    weighted sum are those of a forward pass per task (5 backbone passes)."""
    model, batches = build(tiny_backbone)
    assert len({b["input_ids"].shape[1] for b in batches.values()}) > 1  # the concatenation pads
    step = step_for(model)
    assert list(step.sharing(batches)) == list(batches) and len(step.sharing(batches)["bi"]) == 2
    assert_same(model, batches, step, expected_passes=1)


def test_a_pass_is_shared_only_when_it_adds_little_padding(tiny_backbone):
    """Padding every task to the longest one costs compute: the part shares a pass when that adds at most
    MAX_EXTRA_PADDING padded tokens, else each task runs its own."""
    model, batches = build(tiny_backbone)
    ids = [c[0] for n, b in batches.items() for c in model.tasks[n].encoder_inputs(b)]
    extra = sum(map(len, ids)) * max(i.shape[1] for i in ids) / sum(i.numel() for i in ids) - 1
    assert extra > MAX_EXTRA_PADDING  # short single texts beside long pairs
    assert step_for(model, MAX_EXTRA_PADDING).sharing(batches) == {}
    assert list(step_for(model, extra + 1e-6).sharing(batches)) == list(batches)
    assert_same(model, batches, step_for(model, MAX_EXTRA_PADDING), expected_passes=5)
    even = {n: batches[n] for n in ("sentiment", "ner")}  # of one width: no padding added
    assert list(step_for(model, MAX_EXTRA_PADDING).sharing(even)) == ["sentiment", "ner"]


def test_an_unpadded_backbone_shares_a_pass_whatever_the_padding(tiny_backbone):
    """With ``training.unpadded`` the token-wise layers skip padding, so the padding bound is lifted: the same
    batches that run a pass per task padded share one pass, with the losses and gradients of a pass per task."""
    model, batches = build(tiny_backbone)
    step = step_for(model, MAX_EXTRA_PADDING)
    assert step.sharing(batches) == {}
    model.unpadded = True
    assert list(step.sharing(batches)) == list(batches)
    # the unpadded path calls the encoder's parts, not the encoder: count the passes at its embeddings
    embeddings = model.architecture.token_model(model.backbone).embeddings
    passes = []
    handle = embeddings.register_forward_pre_hook(lambda *_: passes.append(1))
    per_task, per_task_grads = losses_and_grads(model, lambda: {n: model(n, b).loss for n, b in batches.items()})
    assert len(passes) == 5
    shared, shared_grads = losses_and_grads(model, lambda: step.losses(batches))
    handle.remove()
    assert len(passes) == 6
    assert_close_results(shared, shared_grads, per_task, per_task_grads)


def test_long_token_classification_examples_share_their_first_window(tiny_backbone):
    """A tagging batch with the extra windows of a long example (as evaluation collates it): forward trains on
    the first windows, and the shared pass encodes exactly those rows."""
    model, batches = build(tiny_backbone, names=("sentiment", "ner"))
    ner = model.tasks["ner"]
    long = {"tokens": ["word"] * 40, "tags": ["O"] * 39 + ["B-LOC"]}
    short = {"tokens": ["a", "city"], "tags": ["O", "B-LOC"]}
    feats = ner.encode([long, short], model.tokenizer, 16)
    batches["ner"] = ner.collate(feats, model.tokenizer.pad_token_id)
    assert "window_of" in batches["ner"] and len(ner.encoder_inputs(batches["ner"])[0][0]) == 2
    assert_same(model, batches, step_for(model), expected_passes=1)


@pytest.mark.parametrize("arrangement", ["shared", "per_task", "shared_conditioned"])
def test_adapters_share_a_pass_only_when_the_backbone_is_the_same_for_every_task(tiny_backbone, arrangement):
    """One shared LoRA: one pass through it. Per-task adapters or a task embedding change the backbone's
    states per task: a forward pass per task, as before."""
    model, batches = build(tiny_backbone, names=("sentiment", "ner", "pair"), arrangement=arrangement)
    step = step_for(model)
    sharing = arrangement == "shared"
    assert model.shares_backbone(list(batches)) == sharing and bool(step.sharing(batches)) == sharing
    assert_same(model, batches, step, expected_passes=1 if sharing else 3)


def test_a_text2text_task_runs_its_own_pass(tiny_t5):
    """On an encoder-decoder, the head tasks share one encoder pass; the text-to-text task drives the backbone
    itself (it declares no encoder inputs) and runs on its own, with the same losses and gradients."""
    model, batches = build(tiny_t5, names=("sentiment", "translate", "pair"))
    step = step_for(model)
    assert list(step.sharing(batches)) == ["sentiment", "pair"]
    assert_same(model, batches, step, expected_passes=2)
    alone, alone_batches = build(tiny_t5, names=("sentiment", "translate"))  # one head task: nothing to share
    assert step_for(alone).sharing(alone_batches) == {}


def test_an_encode_call_that_was_not_declared_is_an_error(tiny_backbone):
    model, batches = build(tiny_backbone, names=("sentiment", "pair"))
    b = batches["sentiment"]
    with pytest.raises(MultituneError, match="not the one its task declared"):
        with model.shared_encoding([(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))], ["sentiment"]):
            model("pair", batches["pair"])
    with pytest.raises(MultituneError, match="encoded 2 inputs and its tasks used 1"):
        with model.shared_encoding([(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))] * 2,
                                   ["sentiment"]):
            model("sentiment", b)
    assert model._shared is None  # closed after an error
    model("pair", batches["pair"])


@pytest.mark.parametrize("strategy", ["gradnorm", "famo"])
def test_gradnorm_and_famo_train_with_one_backbone_pass(tiny_backbone, toy_data, tmp_path, monkeypatch, strategy):
    """A step of GradNorm or FAMO over three head tasks runs one backbone pass (FAMO: and one more for the losses
    after the update), and trains (whatever padding the pass adds)."""
    monkeypatch.setattr("multitune.training.multistep.MAX_EXTRA_PADDING", math.inf)
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=2, eval_every=2, batch_size=4,
                     max_length=16, log_every=1)
    raw["tasks"] = {t: raw["tasks"][t] for t in ("sentiment", "ner", "similarity")}
    raw["loss_weighting"] = {"strategy": strategy}
    opened = []
    original = MultiTaskModel.shared_encoding

    def spy(self, calls, tasks):
        opened.append(list(tasks))
        return original(self, calls, tasks)

    monkeypatch.setattr(MultiTaskModel, "shared_encoding", spy)
    train(parse_config(raw), progress=False)
    assert opened == [["sentiment", "ner", "similarity"]] * (2 if strategy == "gradnorm" else 4)
    lines = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(set(r["loss"]) == {"sentiment", "ner", "similarity"} for r in lines)
    assert all(torch.isfinite(torch.tensor(list(r["loss"].values()))).all() for r in lines)


def test_a_text2text_mixture_trains_with_gradnorm(tiny_t5, toy_data, tmp_path, monkeypatch):
    monkeypatch.setattr("multitune.training.multistep.MAX_EXTRA_PADDING", math.inf)
    raw = text2text_config(toy_data, tiny_t5, tmp_path / "run", tasks=("sentiment", "similarity", "translate"),
                           max_steps=2, eval_every=2, max_length=16, batch_size=4, log_every=1)
    raw["loss_weighting"] = {"strategy": "gradnorm"}
    results = train(parse_config(raw), progress=False)
    assert results["train"]["steps"] == 2
