"""The bi-encoder (``type: regression, encoder: bi``): before any step it scores exactly as its backbone's
cosine; CoSENT and MSE train it; its export and models saved by earlier versions score as multitune does."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.conftest import toy_config, write_toy_data

LOW, HIGH = 0.0, 5.0
PAIRS = [(f"the {a} was {w}", f"a {b} is {v}") for a, b, w, v in zip(
    ["film", "meal", "book", "show", "hotel", "song", "game", "trip"] * 3,
    ["song", "trip", "film", "book", "meal", "show", "hotel", "game"] * 3,
    ["great", "awful", "lovely", "boring", "superb", "dull"] * 4,
    ["dull", "great", "poor", "lovely", "fantastic", "awful"] * 4)]


def _bi_task(**config):
    from multitune.tasks.regression import RegressionConfig, RegressionTask

    task = RegressionTask("sim", RegressionConfig(type="regression", encoder="bi", label_range=[LOW, HIGH],
                                                  **config))
    task.setup([])
    return task


def _model(tiny_backbone, task, normalize: bool):
    from multitune.backbones import load_backbone
    from multitune.model import MultiTaskModel

    backbone, tokenizer = load_backbone(tiny_backbone)
    return MultiTaskModel(backbone, {"sim": task}, tokenizer, pooling="mean", normalize_embeddings=normalize)


def _cosines(model, pairs) -> torch.Tensor:
    first = model.embed_texts([a for a, _ in pairs])
    second = model.embed_texts([b for _, b in pairs])
    return torch.nn.functional.cosine_similarity(first, second, dim=-1)


@pytest.mark.parametrize("normalize", [False, True])
def test_untrained_bi_encoder_scores_the_backbones_cosine(tiny_backbone, normalize):
    """No layer sits between the embeddings and the score: before any step the prediction is the backbone's
    cosine mapped onto the label range, and a pair below cosine 0 scores the range's low end."""
    task = _bi_task()
    model = _model(tiny_backbone, task, normalize)
    assert sum(p.numel() for p in model.heads.parameters()) == 0
    pairs = PAIRS + [(a, a) for a, _ in PAIRS[:2]]
    cosine = _cosines(model, pairs)
    scores = torch.tensor([p["score"] for p in model.predict("sim", pairs)])
    assert len(scores) >= 20
    assert torch.allclose(scores, LOW + (HIGH - LOW) * cosine.clamp(min=0), atol=1e-5)
    assert scores[-1] == pytest.approx(HIGH, abs=1e-5)  # a text and itself


class _FixedEmbeddings:
    """Stands in for the model: its first ``embed`` call returns ``first``, the second ``second``."""

    def __init__(self, first, second):
        self.rows = [torch.tensor(first), torch.tensor(second)]

    def embed(self, input_ids, attention_mask, token_type_ids=None):
        return self.rows.pop(0)


def test_a_negative_cosine_scores_the_low_end_and_still_learns_under_mse():
    task = _bi_task(objective="mse")
    cosine = torch.tensor([-0.6, 0.0, 0.8])
    first = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    second = [[-0.6, 0.8], [0.0, 2.0], [0.8, 0.6]]
    batch = {k: torch.zeros(3, 1) for k in ("input_ids", "attention_mask", "pair_input_ids",
                                            "pair_attention_mask")}
    out = task.forward(_FixedEmbeddings(first, second), None, {**batch, "labels": torch.tensor([0.2, 0.0, 1.0])})
    assert torch.allclose(out.outputs["scores"], torch.tensor([0.0, 0.0, 0.8]))
    assert [p["score"] for p in task.decode(out, batch, [{}] * 3)] == pytest.approx([LOW, LOW, 4.0])
    # the loss sees the cosine itself: the first pair (cosine -0.6, gold 0.2) is pulled up
    expected = ((cosine - torch.tensor([0.2, 0.0, 1.0])) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bi_encoder_losses_are_taken_on_the_cosine(tiny_backbone):
    """mse: squared error of the (unclamped) cosine against the score on the 0-1 scale; cosent: CoSENT of the
    cosines against the scores."""
    from multitune.tasks.regression import cosent_loss

    examples = [{"text": a, "text_pair": b, "label": str(1.0 + i % 4)} for i, (a, b) in enumerate(PAIRS[:8])]
    for objective in ("mse", "cosent"):
        task = _bi_task(objective=objective)
        model = _model(tiny_backbone, task, normalize=False).eval()
        batch = task.collate(task.encode(examples, model.tokenizer, 32), model.tokenizer.pad_token_id)
        with torch.no_grad():
            out = model("sim", batch)
        cosine = _cosines(model, [(e["text"], e["text_pair"]) for e in examples])
        labels = torch.tensor([(float(e["label"]) - LOW) / (HIGH - LOW) for e in examples])
        expected = (torch.nn.functional.mse_loss(cosine, labels) if objective == "mse" else
                    cosent_loss(cosine, labels))
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6), objective
        assert torch.allclose(out.outputs["scores"], cosine.clamp(min=0), atol=1e-5)


def test_the_default_objective_is_mse_and_cosent_needs_the_bi_encoder():
    from multitune.config.parse import from_dict
    from multitune.errors import ConfigError
    from multitune.tasks.regression import RegressionConfig

    assert from_dict(RegressionConfig, {"type": "regression", "encoder": "bi", "label_range": [0, 1]}).objective == "mse"
    with pytest.raises(ConfigError) as err:
        from_dict(RegressionConfig, {"type": "regression", "objective": "cosent"}, "tasks.sim")
    assert "tasks.sim.objective" in str(err.value) and "encoder: bi" in str(err.value)
    with pytest.raises(ConfigError, match="expected one of: mse, cosent"):
        from_dict(RegressionConfig, {"type": "regression", "encoder": "bi", "label_range": [0, 1],
                                     "objective": "cosine"}, "tasks.sim")


def test_cosent_loss_matches_a_hand_computed_value():
    """log(1 + sum over gold-ordered pairs i > j of exp(20 (cos_j - cos_i))), here with one pair ranked the
    wrong way round (rows 1 and 2) and a tie (rows 2 and 3), which adds no term."""
    from multitune.tasks.regression import cosent_loss

    cosine = torch.tensor([0.9, 0.5, 0.1, 0.3])
    labels = torch.tensor([4.0, 1.0, 2.0, 2.0])
    # (i, j) with labels[i] > labels[j]: (0, 1), (0, 2), (0, 3), (2, 1), (3, 1)
    terms = [20 * (0.5 - 0.9), 20 * (0.1 - 0.9), 20 * (0.3 - 0.9), 20 * (0.5 - 0.1), 20 * (0.5 - 0.3)]
    expected = math.log(1 + sum(math.exp(t) for t in terms))
    assert cosent_loss(cosine, labels).item() == pytest.approx(expected, rel=1e-6)
    assert cosent_loss(torch.tensor([0.5, 0.6]), torch.tensor([5.0, 1.0])).item() == pytest.approx(
        math.log(1 + math.exp(2.0)), rel=1e-6)


def test_cosent_loss_is_order_invariant_and_asks_for_the_order_only():
    from multitune.tasks.regression import cosent_loss

    generator = torch.Generator().manual_seed(0)
    cosine = torch.rand(16, generator=generator) * 2 - 1
    labels = torch.randint(0, 6, (16,), generator=generator).float()
    loss = cosent_loss(cosine, labels)
    for _ in range(3):
        order = torch.randperm(16, generator=generator)
        assert cosent_loss(cosine[order], labels[order]).item() == pytest.approx(loss.item(), rel=1e-6)
    # any increasing map of the gold scores: the same loss (the 0-5 scale or the 0-1 scale)
    assert cosent_loss(cosine, labels / 5).item() == pytest.approx(loss.item(), rel=1e-6)
    assert cosent_loss(cosine, labels ** 3 + 2).item() == pytest.approx(loss.item(), rel=1e-6)
    # no two gold scores differ: nothing to rank, a zero loss with a finite, zero gradient
    flat = cosine.clone().requires_grad_(True)
    tied = cosent_loss(flat, torch.full((16,), 3.0))
    tied.backward()
    assert tied.item() == 0.0 and torch.equal(flat.grad, torch.zeros(16))
    # the loss falls as the cosines follow the gold order
    ranked = cosent_loss(labels / 5, labels)
    assert ranked.item() < loss.item()


@pytest.fixture(scope="module")
def bi_run(tiny_backbone, tmp_path_factory):
    """A tiny bi-encoder trained a few steps with each objective (normalised embeddings for cosent)."""
    import multitune

    root = tmp_path_factory.mktemp("bi")
    files = write_toy_data(root)
    for objective, normalize in (("cosent", True), ("mse", False)):
        raw = toy_config(files, tiny_backbone, root / objective, max_steps=6, eval_every=3)
        raw["normalize_embeddings"] = normalize
        raw["tasks"] = {"sim": {**raw["tasks"]["similarity"], "encoder": "bi", "objective": objective}}
        multitune.train(multitune.parse_config(raw), overwrite=True, progress=False)
    return root


@pytest.mark.parametrize("objective", ["cosent", "mse"])
def test_bi_encoder_export_scores_as_multitune_predicts(bi_run, objective):
    """RUN/model and the export load in sentence-transformers; the score from their embeddings, with the
    formula recorded in the export's config.json, is multitune's prediction."""
    from sentence_transformers import SentenceTransformer

    import multitune
    from multitune.export.task import export_task

    run = bi_run / objective
    model = multitune.load(run)
    saved = json.loads((run / "model" / "multitune.json").read_text())
    assert saved["tasks"]["sim"]["state"]["score"] == "max(cosine, 0)"
    assert saved["tasks"]["sim"]["config"]["objective"] == objective
    out = bi_run / f"export-{objective}"
    export_task(run, "sim", out, overwrite=True, source="final")
    config = json.loads((out / "config.json").read_text())
    assert config["multitune_score"] == "low + (high - low) * max(cosine, 0)"
    assert config["multitune_label_range"] == [LOW, HIGH]
    ours = [p["score"] for p in model.predict("sim", PAIRS)]
    for directory in (run / "model", out):
        encoder = SentenceTransformer(str(directory))
        a = encoder.encode([x for x, _ in PAIRS], convert_to_tensor=True)
        b = encoder.encode([y for _, y in PAIRS], convert_to_tensor=True)
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        theirs = (LOW + (HIGH - LOW) * cosine.clamp(min=0)).tolist()
        assert len(theirs) >= 20 and max(abs(o - t) for o, t in zip(ours, theirs)) <= 1e-4, directory
    assert multitune.load(out).predict("sim", PAIRS) == model.predict("sim", PAIRS)


def test_a_bi_encoder_saved_before_the_score_was_kept_scores_as_it_was_trained(bi_run, tmp_path):
    """A model saved before its state named the score was trained on (cosine + 1) / 2: it loads and keeps
    predicting that, and its export's card and config say so; a score this version does not know is refused
    in one line."""
    import multitune
    from multitune.errors import MultituneError
    from multitune.export.task import export_task

    run = tmp_path / "old"
    shutil.copytree(bi_run / "mse", run)
    meta_file = run / "model" / "multitune.json"
    meta = json.loads(meta_file.read_text())
    del meta["tasks"]["sim"]["state"]["score"]
    del meta["tasks"]["sim"]["config"]["objective"]
    meta_file.write_text(json.dumps(meta))
    model = multitune.load(run)
    cosine = _cosines(model, PAIRS)
    scores = torch.tensor([p["score"] for p in model.predict("sim", PAIRS)])
    assert torch.allclose(scores, LOW + (HIGH - LOW) * (cosine + 1) / 2, atol=1e-5)
    assert model.tasks["sim"].state()["score"] == "(cosine + 1) / 2"  # saved again, it stays what it was
    out = tmp_path / "export"
    export_task(run, "sim", out, overwrite=True, source="final")
    assert json.loads((out / "config.json").read_text())["multitune_score"] == "low + (high - low) * (cosine + 1) / 2"
    assert "(cosine + 1) / 2" in (out / "README.md").read_text()
    assert multitune.load(out).predict("sim", PAIRS) == model.predict("sim", PAIRS)

    meta["tasks"]["sim"]["state"]["score"] = "cosine ** 2"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(MultituneError) as err:
        multitune.load(run)
    message = str(err.value)
    assert "\n" not in message and "tasks.sim.state" in message and "cosine ** 2" in message
