"""Token classification of inputs longer than ``max_length``: every word gets a tag from a window of its own
(PyTorch, mixed-task and ONNX paths), evaluation counts every word, training still sees the first window."""

from __future__ import annotations

import math

import pytest
import torch

from multitune.backbones import load_backbone
from multitune.config.parse import from_dict
from multitune.evaluation import evaluate_task
from multitune.inference import predict_all
from multitune.model import MultiTaskModel
from multitune.tasks import TASKS
from multitune.tasks.base import IGNORE_INDEX
from multitune.tasks.token_classification import window_spans

MAX_LENGTH = 24  # 22 word pieces per window besides [CLS] and [SEP]
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# one word piece each in the MiniLM vocabulary, so that sub-token positions are word positions
WORDS = ["the", "film", "was", "great", "and", "then", "very", "oslo", "paris", "anna", "left", "for", "good"]


def _words(n: int) -> list[str]:
    return [WORDS[(i * 7 + i // 5) % len(WORDS)] for i in range(n)]


@pytest.fixture(scope="module")
def model(tiny_backbone) -> MultiTaskModel:
    backbone, tok = load_backbone(tiny_backbone)
    impl = TASKS.get("token_classification")
    task = impl("ner", from_dict(impl.config_class, {"type": "token_classification", "labels": LABELS}))
    task.setup([])
    torch.manual_seed(3)
    m = MultiTaskModel(backbone, {"ner": task}, tok, max_length=MAX_LENGTH)
    with torch.no_grad():  # a random head with a spread of tags, not one dominant tag
        m.heads["ner"].classifier.weight.normal_(0, 2.0)
    return m.eval()


def _owner(spans: list[tuple[int, int]], n: int, pos: int) -> int:
    """The window farthest-from-a-cut for ``pos``, written out independently of the library."""
    def room(span):
        start, end = span
        left = pos - start if start > 0 else math.inf
        right = end - 1 - pos if end < n else math.inf
        return min(left, right)

    holding = [k for k, s in enumerate(spans) if s[0] <= pos < s[1]]
    return max(holding, key=lambda k: (room(spans[k]), -k))


def test_window_spans_cover_with_overlap():
    assert window_spans(10, 22) == [(0, 10)]
    spans = window_spans(70, 22)
    assert spans[0] == (0, 22) and spans[-1] == (48, 70)
    assert all(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # consecutive windows overlap
    assert all(e - s == 22 for s, e in spans)


def test_first_window_is_what_truncation_gives(model):
    """Training reads a feature's own input_ids and labels: unchanged by the windows."""
    task, tok = model.tasks["ner"], model.tokenizer
    words = ["Schwarzenegger", "visited", "Oslo", "today"] * 12
    ex = {"tokens": words, "tags": ["B-PER", "O", "B-LOC", "O"] * 12}
    (feat,) = task.encode([ex], tok, MAX_LENGTH)
    truncated = tok([words], is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
    assert feat["input_ids"] == truncated["input_ids"][0]
    assert len(feat["labels"]) == MAX_LENGTH and len(feat["windows"]) >= 3
    owned = sorted(w for row in (feat, *feat["windows"]) for w in row["word_index"] if w >= 0)
    assert owned == list(range(len(words)))  # every word is predicted by exactly one window
    batch = task.collate([feat, task.encode([{"tokens": ["a"], "tags": ["O"]}], tok, MAX_LENGTH)[0]], 0)
    assert batch["window_of"].tolist() == [0] * (1 + len(feat["windows"])) + [1]
    assert batch["labels"].shape == (2, MAX_LENGTH) and (batch["labels"][1, 3:] == IGNORE_INDEX).all()
    with torch.no_grad():  # the training pass scores the first windows only, as before
        trained = task.forward(model, model.heads["ner"], batch)
        first_only = task.forward(model, model.heads["ner"], task.collate(
            [{k: v for k, v in feat.items() if k != "windows"},
             task.encode([{"tokens": ["a"], "tags": ["O"]}], tok, MAX_LENGTH)[0]], 0))
    assert torch.allclose(trained.loss, first_only.loss)
    # the features training draws its batches from carry no extra windows: nothing padded or counted for them
    (train_feat,) = task.training_features([feat])
    assert "windows" not in train_feat and train_feat["input_ids"] == feat["input_ids"] and "windows" in feat
    assert "window_of" not in task.collate([train_feat], 0)


def test_every_word_is_tagged_by_its_window(model):
    words = _words(3 * MAX_LENGTH)
    assert len(model.tokenizer(words, is_split_into_words=True)["input_ids"]) == len(words) + 2
    (pred,) = model.predict("ner", [{"tokens": words}])
    assert len(pred["tags"]) == len(words)
    spans = window_spans(len(words), MAX_LENGTH - 2)
    assert len(spans) >= 3
    # each window on its own: an input that fits, with the same positions as inside the long input
    alone = [model.predict("ner", [{"tokens": words[s:e]}])[0]["tags"] for s, e in spans]
    expected = []
    for pos in range(len(words)):
        k = _owner(spans, len(words), pos)
        expected.append(alone[k][pos - spans[k][0]])
    assert pred["tags"] == expected
    # the choice of window matters here: some word in an overlap is tagged differently by its two windows
    assert any(alone[k][p - spans[k][0]] != alone[k + 1][p - spans[k + 1][0]]
               for k in range(len(spans) - 1) for p in range(spans[k + 1][0], spans[k][1]))
    # truncation would have left the words past the first window untagged (O)
    assert any(tag != "O" for tag in pred["tags"][MAX_LENGTH:])


def test_mixed_and_batched_paths_agree(model):
    long_text = " ".join(_words(3 * MAX_LENGTH))
    texts = [long_text, "anna left oslo", " ".join(_words(2 * MAX_LENGTH))]
    one_by_one = [model.predict("ner", [t])[0] for t in texts]
    assert model.predict("ner", texts, batch_size=2) == one_by_one
    assert [p["ner"] for p in predict_all(model, texts, ["ner"])] == one_by_one


def test_evaluation_counts_every_word(model):
    """A head that says B-PER for every word: gold B-PER everywhere scores 1.0 only if every word is tagged."""
    task = model.tasks["ner"]
    head = model.heads["ner"].classifier
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0]))
        examples = [{"tokens": _words(n), "tags": ["B-PER"] * n} for n in (3 * MAX_LENGTH, 5, 2 * MAX_LENGTH + 3)]
        feats = task.encode(examples, model.tokenizer, MAX_LENGTH)
        metrics, preds = evaluate_task(model, task, feats, examples, batch_size=2, pad_token_id=0)
        assert [len(p["tags"]) for p in preds] == [len(ex["tokens"]) for ex in examples]
        assert metrics["f1"] == 1.0 and metrics["recall"] == 1.0
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])


def test_onnx_runtime_windows_the_same_way(model, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from multitune.onnx import OnnxMultiTaskModel, export_onnx

    export_onnx(model, tmp_path / "onnx")
    onnx_model = OnnxMultiTaskModel.load(tmp_path / "onnx", device="cpu")
    texts = [" ".join(_words(3 * MAX_LENGTH)), "anna left oslo"]
    ours, theirs = model.predict("ner", texts), onnx_model.predict("ner", texts)
    assert [p["tags"] for p in theirs] == [p["tags"] for p in ours]
    assert len(theirs[0]["tags"]) == 3 * MAX_LENGTH
    assert [p["ner"]["tags"] for p in predict_all(onnx_model, texts, ["ner"])] == [p["tags"] for p in ours]
