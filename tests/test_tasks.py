"""Task types: unit checks of each task's encoding, masking, decoding and metrics, and a contract test
that runs every registered task through train steps, save, load and predict on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from multitune.backbones.architectures import EncoderArchitecture
from multitune.config.parse import from_dict
from multitune.config.schema import TaskConfig
from multitune.errors import DataError
from multitune.tasks import TASKS
from multitune.tasks.base import IGNORE_INDEX
from multitune.tasks.token_classification import bio_spans
from tests.conftest import text2text_config

EXAMPLE_INPUT = {"classification": "the film was great", "token_classification": "Anna Smith visited Oslo",
                 "regression": ("the film was great", "the film was lovely"), "masked_lm": "the meal near Oslo",
                 "text2text": "der film war Oslo", "chat": "What is 3 hours in minutes?"}
# task name in the toy configs, and the backbone fixture it runs on (text2text needs a generative one)
CONTRACT = {"classification": ("sentiment", "tiny_backbone"), "token_classification": ("ner", "tiny_backbone"),
            "regression": ("similarity", "tiny_backbone"), "masked_lm": ("mlm", "tiny_backbone"),
            "text2text": ("translate", "tiny_t5"), "chat": ("chat", "tiny_llama")}


def make(kind: str, tokenizer=None, **cfg):
    """A task of type ``kind``, bound to an encoder backbone family when a tokenizer is given."""
    cls = TASKS.get(kind)
    task = cls("t", from_dict(cls.config_class, {"type": kind, **cfg}))
    if tokenizer is not None:
        task.bind(EncoderArchitecture(tokenizer), tokenizer)
    return task




def test_token_labels_sit_on_first_subtoken(tokenizer):
    task = make("token_classification")
    ex = {"tokens": ["Schwarzenegger", "visited", "Oslo"], "tags": ["B-PER", "O", "B-LOC"]}
    task.setup([ex])
    assert task.labels == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    (feat,) = task.encode([ex], tokenizer, 32)
    pieces = tokenizer.convert_ids_to_tokens(feat["input_ids"])
    labelled = [(p, task.labels[lab]) for p, lab in zip(pieces, feat["labels"]) if lab != IGNORE_INDEX]
    assert [lab for _, lab in labelled] == ["B-PER", "O", "B-LOC"]
    assert sum(lab == IGNORE_INDEX for lab in feat["labels"]) == len(pieces) - 3  # CLS/SEP + later sub-tokens
    assert len(pieces) > 5  # the name really was split into several pieces


def test_bio_spans_and_strict_order():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)]
    task = make("token_classification")
    task.setup([{"tokens": ["a", "b"], "tags": ["B-PER", "I-PER"]}])
    with pytest.raises(DataError, match=r"f.conll:8: tag 'I-PER' follows 'O'"):
        task.check_examples([{"tokens": ["a", "b"], "tags": ["O", "I-PER"], "_file": "f.conll", "_line": 7}])
    with pytest.raises(DataError, match=r"tag 'PER' is not BIO"):
        task.check_examples([{"tokens": ["a"], "tags": ["PER"], "_file": "f", "_line": 1}])


def test_classification_labels_and_unknown_label():
    task = make("classification", labels=["neg", "pos"])
    task.setup([])
    with pytest.raises(DataError, match=r"x.tsv:4: label 'neutral' is not in the label set of task 't' \(neg, pos\)"):
        task.check_examples([{"text": "a", "label": "neutral", "_file": "x.tsv", "_line": 4}])
    numeric = make("classification")
    numeric.setup([{"label": "10"}, {"label": "2"}, {"label": "1"}])
    assert numeric.labels == ["1", "2", "10"]


def test_multi_label_classification(tokenizer):
    task = make("classification", multi_label=True)
    exs = [{"text": "a b", "label": "x,y"}, {"text": "c", "label": ["z"]}]
    task.setup(exs)
    assert task.labels == ["x", "y", "z"]
    batch = task.collate(task.encode(exs, tokenizer, 16), 0)
    assert batch["labels"].tolist() == [[1, 1, 0], [0, 0, 1]]
    preds = [{"labels": ["x", "y"]}, {"labels": ["x"]}]
    m = task.compute_metrics(preds, exs)
    assert m["accuracy"] == 0.5 and m["micro_f1"] == pytest.approx(2 * 2 / (3 + 3))


def test_regression_range_scaling_and_errors(tokenizer):
    task = make("regression", label_range=[0, 5])
    (feat,) = task.encode([{"text": "a", "text_pair": "b", "label": "4.0"}], tokenizer, 16)
    assert feat["labels"] == pytest.approx(0.8)
    with pytest.raises(DataError, match=r"s.csv:3: score 7.0 is outside label_range \[0.0, 5.0\]"):
        task.check_examples([{"text": "a", "label": "7", "_file": "s.csv", "_line": 3}])
    with pytest.raises(DataError, match=r"s.csv:2: label must be a number, got 'high'"):
        task.check_examples([{"text": "a", "label": "high", "_file": "s.csv", "_line": 2}])
    with pytest.raises(DataError, match=r"finite number"):
        task.check_examples([{"text": "a", "label": "nan", "_file": "s.csv", "_line": 2}])
    m = task.compute_metrics([{"score": 1.0}, {"score": 2.0}, {"score": 3.0}],
                             [{"label": "1"}, {"label": "2"}, {"label": "4"}])
    assert m["spearman"] == pytest.approx(1.0) and m["mse"] == pytest.approx(1 / 3)


def test_masking_follows_80_10_10_and_spares_special_tokens(tokenizer):
    task = make("masked_lm", tokenizer)
    texts = [{"text": " ".join(["the quick brown fox jumps over the lazy dog"] * 3)}] * 64
    feats = task.encode(texts, tokenizer, 128)
    batch = task.collate(feats, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    original = task.collate(feats, tokenizer.pad_token_id, torch.Generator().manual_seed(0))["labels"]
    chosen = batch["labels"] != IGNORE_INDEX
    assert torch.equal(original, batch["labels"])  # same generator seed -> same masks
    assert 0.12 < chosen.float().mean() < 0.18
    ids = torch.tensor([f["input_ids"] for f in feats])
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS] and [SEP] never chosen
    masked = (batch["input_ids"] == tokenizer.mask_token_id) & chosen
    kept = (batch["input_ids"] == ids) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    assert 0.05 < kept.sum() / chosen.sum() < 0.16  # 10% unchanged (+ random draws of the same id)


@pytest.mark.parametrize("kind", TASKS.names())
def test_contract_train_save_load_predict(kind, request, toy_data, tmp_path):
    """Every registered task: a few train steps change its head, then save -> load gives the same predictions."""
    from multitune.config import parse_config
    from multitune.model import load
    from multitune.training import train

    name, backbone = CONTRACT[kind]
    raw = text2text_config(toy_data, request.getfixturevalue(backbone), tmp_path / "run", tasks=(name,),
                           max_steps=4, eval_every=2)
    results = train(parse_config(raw), progress=False)
    task = TASKS.get(kind)
    assert task.main_metric in results["validation"][name]
    run = tmp_path / "run"
    meta = json.loads((run / "model" / "multitune.json").read_text())
    assert meta["tasks"][name]["config"]["type"] == kind and "data" not in meta["tasks"][name]["config"]
    model = load(run)
    inputs = [EXAMPLE_INPUT[kind]] * 3
    first = model.predict(name, inputs)
    assert first == load(run).predict(name, inputs)
    assert json.dumps(first)  # JSON-able
    assert len(first) == 3
    if kind != "masked_lm":  # masked positions differ per row, so identical MLM inputs score differently
        assert first[0] == first[2]


def test_tasks_share_one_backbone(tiny_backbone, toy_data):
    from multitune.backbones import load_backbone
    from multitune.model import MultiTaskModel

    backbone, tok = load_backbone(tiny_backbone)
    a, b = make("classification", labels=["x", "y"]), make("regression")
    a.setup([])
    model = MultiTaskModel(backbone, {"a": a, "b": b}, tok)
    n_backbone = sum(p.numel() for p in backbone.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_backbone + (32 * 2 + 2) + (32 + 1)
    assert isinstance(TaskConfig, type)
