"""``decode: score_labels``: text-to-text tasks with a label set predict the label whose text is most likely
after the prompt. The batched scores (one prompt pass shared by every label) equal the teacher-forced
training loss of each (example, label) pair computed alone, on tiny random-init LLaMA-like and T5 models;
probabilities sum to 1, no prediction is invalid; config errors; a run trains, evaluates and exports with it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from multitune.backbones import load_backbone
from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.errors import ConfigError
from multitune.model import MultiTaskModel
from multitune.tasks import TASKS
from tests.conftest import text2text_config

# labels of different token lengths, one a prefix of another
LABELS = ["positive", "negative", "not sure", "not"]
TEXTS = ["the film was great", "a dull , boring meal that went on and on and on", "ok",
         "anna visited oslo and loved the hotel"]


def _task(**cfg):
    impl = TASKS.get("text2text")
    config = from_dict(impl.config_class, {"type": "text2text", "labels": LABELS, "decode": "score_labels",
                                           "prefix": "sentiment: ", **cfg}, "tasks.t")
    task = impl("t", config)
    if task.labels:
        task.setup([])
    return task


def _model(path, **cfg):
    backbone, tok = load_backbone(path)
    return MultiTaskModel(backbone, {"t": _task(**cfg)}, tok, max_length=32).eval()


def _alone(model, text: str, label: str) -> float:
    """Log-likelihood of ``label`` after ``text``'s prompt from the training loss of that one pair: the loss is
    the mean over the target tokens, so the summed log-likelihood is minus the loss times their number."""
    task, arch = model.tasks["t"], model.architecture
    (feat,) = task.encode([{"source": text, "target": label}], model.tokenizer, model.max_length)
    batch = task.collate([feat], model.tokenizer.pad_token_id)
    with torch.no_grad():
        loss = arch.text2text_loss(model.backbone, batch)
    return -float(loss) * len(arch.target_tokens(feat))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_t5"])
def test_batched_scores_equal_each_pair_scored_alone(fixture, request):
    model = _model(request.getfixturevalue(fixture))
    task = model.tasks["t"]
    tokens = task.label_tokens()
    assert len({len(t) for t in tokens}) > 1 and max(len(t) for t in tokens) >= 3  # multi-token, padded
    for label, ids in zip(LABELS, tokens):  # the tokens trained as the label's target, end token included
        (feat,) = task.encode([{"source": "x", "target": label}], model.tokenizer, 32)
        assert model.architecture.target_tokens(feat) == ids and ids[-1] == model.architecture.end_id
    feats = task.encode([{"source": t} for t in TEXTS], model.tokenizer, model.max_length)
    batch = task.collate(feats, model.tokenizer.pad_token_id)  # prompts of different lengths, padded
    with torch.no_grad():
        scores = model.infer("t", batch).outputs["label_scores"]
    expected = torch.tensor([[_alone(model, text, label) for label in LABELS] for text in TEXTS])
    torch.testing.assert_close(scores, expected, atol=2e-4, rtol=1e-5)

    preds = model.predict("t", TEXTS, batch_size=3)  # batches of different padding than above
    for pred, row in zip(preds, expected):
        probs = row.double().softmax(-1)
        assert set(pred) == {"label", "text", "scores"} and pred["text"] == pred["label"]
        assert pred["label"] == LABELS[int(probs.argmax())]
        assert list(pred["scores"]) == LABELS and math.isclose(sum(pred["scores"].values()), 1.0, abs_tol=1e-5)
        torch.testing.assert_close(torch.tensor([pred["scores"][lab] for lab in LABELS], dtype=torch.float64),
                                   probs, atol=1e-4, rtol=0)
    gold = [{"source": t, "target": LABELS[i % 2]} for i, t in enumerate(TEXTS)]
    metrics = task.compute_metrics(preds, gold)
    assert metrics["invalid"] == 0.0
    assert metrics["accuracy"] == sum(p["label"] == g["target"] for p, g in zip(preds, gold)) / len(gold)


def test_mean_normalization_divides_by_the_label_length(tiny_llama):
    summed, mean = _model(tiny_llama), _model(tiny_llama, score_normalization="mean")
    mean.load_state_dict(summed.state_dict())
    task = summed.tasks["t"]
    batch = task.collate(task.encode([{"source": t} for t in TEXTS], summed.tokenizer, 32), 0)
    with torch.no_grad():
        total = summed.infer("t", batch).outputs["label_scores"]
        per_token = mean.infer("t", batch).outputs["label_scores"]
    lengths = torch.tensor([len(t) for t in task.label_tokens()], dtype=torch.float32)
    torch.testing.assert_close(per_token, total / lengths)
    (pred,) = mean.predict("t", [TEXTS[0]])
    probs = (total[0] / lengths).double().softmax(-1)
    assert pred["label"] == LABELS[int(probs.argmax())]


def test_config_errors(tiny_llama):
    with pytest.raises(ConfigError, match=r"^tasks.t.decode: score_labels scores the texts of a label set"):
        _task(labels=None).setup([{"target": f"free text number {i}"} for i in range(40)])
    inferred = _task(labels=None)  # a label set inferred from the train targets is one
    inferred.setup([{"target": "yes"}] * 10 + [{"target": "no"}] * 10)
    assert inferred.labels == ["no", "yes"]
    with pytest.raises(ConfigError, match=r"tasks.t.decode: got 'score'.*expected one of: generate, score_labels"):
        _task(decode="score")
    with pytest.raises(ConfigError, match=r"tasks.t.score_normalization: only applies with decode: score_labels"):
        _task(decode="generate", score_normalization="mean")


def test_run_trains_evaluates_saves_and_exports_with_score_labels(tiny_llama, toy_data, tmp_path):
    from multitune.export.task import export_task
    from multitune.model import load
    from multitune.training import train

    raw = text2text_config(toy_data, tiny_llama, tmp_path / "run", tasks=("sentiment_text",), max_steps=2,
                           eval_every=2, batch_size=8)
    raw["tasks"]["sentiment_text"]["decode"] = "score_labels"
    results = train(parse_config(raw), progress=False)
    val = results["validation"]["sentiment_text"]
    assert val["invalid"] == 0.0 and 0.0 <= val["accuracy"] <= 1.0
    model = load(tmp_path / "run")
    (pred,) = model.predict("sentiment_text", ["the film was great"])
    assert pred["label"] in ("negative", "positive") and set(pred["scores"]) == {"negative", "positive"}
    export_task(tmp_path / "run", "sentiment_text", tmp_path / "export", source="final")
    params = json.loads((tmp_path / "export" / "config.json").read_text())["task_specific_params"]["sentiment_text"]
    assert params["decode"] == "score_labels" and params["labels"] == ["negative", "positive"]
    assert "decode: score_labels" in (tmp_path / "export" / "README.md").read_text()
