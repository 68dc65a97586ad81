"""Exports that the ecosystem's own clients load and that predict exactly what multitune predicts.

Each test trains a tiny random-init model for a few steps, exports it, loads the export with the stock client
(transformers ``pipeline`` / Auto classes, sentence-transformers) and compares with ``multitune predict`` /
``embed`` on at least 20 inputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import text2text_config, toy_config, write, write_toy_data

TEXTS = [f"the {thing} near {place} was {word}" for thing, place, word in zip(
    ["film", "meal", "book", "show", "hotel", "song", "game", "trip"] * 3,
    ["Paris", "Oslo", "Lima", "Kyiv", "Rome", "Quito"] * 4,
    ["great", "awful", "lovely", "boring", "superb", "dull", "fantastic", "poor"] * 3)]
LONG = "the long review goes on and on " * 12  # longer than the training max_length (32 tokens)
PAIRS = [(a, b) for a, b in zip(TEXTS, TEXTS[3:] + TEXTS[:3])]


def _silence():
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def run(tiny_backbone, tmp_path_factory):
    """One run with a task of every head kind: pooled and pooler sentence heads, pairs, multi-label, tagging,
    cross- and bi-encoder regression, masked LM."""
    import multitune

    root = tmp_path_factory.mktemp("export")
    files = write_toy_data(root)
    raw = toy_config(files, tiny_backbone, root / "run", max_steps=12)
    for name in ("sentiment", "similarity"):  # the pooled layout, whatever the default
        raw["tasks"][name]["head"] = "pooled"
    rows = ["text\ttext_pair\tlabel"] + [f"{a}\t{b}\t{'same' if i % 2 else 'different'}"
                                          for i, (a, b) in enumerate(PAIRS * 2)]
    multi = ["sentence\tlabel"] + [f"{t}\t{'food' if i % 2 else 'place'}{',travel' if i % 3 == 0 else ''}"
                                   for i, t in enumerate(TEXTS * 2)]
    raw["tasks"].update({
        "sentiment_pooler": {**raw["tasks"]["sentiment"], "head": "pooler"},
        "similarity_pooler": {**raw["tasks"]["similarity"], "head": "pooler"},
        "paraphrase": {"type": "classification", "head": "pooled",
                       "data": {"train": {"path": str(write(root / "pairs.tsv", "\n".join(rows) + "\n"))}}},
        "topics": {"type": "classification", "multi_label": True, "head": "pooled",
                   "data": {"train": {"path": str(write(root / "multi.tsv", "\n".join(multi) + "\n")),
                                      "text": "sentence"}}},
        "bi_similarity": {**raw["tasks"]["similarity"], "encoder": "bi"},
    })
    multitune.train(multitune.parse_config(raw), overwrite=True, progress=False)
    return root


def _export(run_root: Path, task: str, **kwargs) -> tuple[Path, dict]:
    from multitune.export.task import export_task

    out = run_root / f"export-{task}"
    # the run's final model, which the tests compare with (per-task-best exports: test_per_task_best.py)
    report = export_task(run_root / "run", task, out, overwrite=True, source="final", **kwargs)
    return out, report


def test_sentence_classification_exports_load_in_the_stock_pipeline_exactly(run):
    """Pooler head: the stock BERT class, no remote code; pooled (mean) head: the shipped class with
    trust_remote_code. Pipeline scores equal multitune's for single texts and pairs."""
    from transformers import pipeline

    import multitune

    _silence()
    model = multitune.load(run / "run")
    for task, remote, inputs in (("sentiment_pooler", False, TEXTS + [LONG]), ("sentiment", True, TEXTS + [LONG]),
                                 ("paraphrase", True, PAIRS)):
        out, report = _export(run, task)
        assert report["trust_remote_code"] is remote and report["max_difference"] <= 1e-4
        config = json.loads((out / "config.json").read_text())
        assert config["id2label"] == {str(i): lab for i, lab in enumerate(model.tasks[task].labels)}
        assert config["problem_type"] == "single_label_classification"
        clf = pipeline("text-classification", model=str(out), trust_remote_code=remote)
        ours = model.predict(task, inputs)
        queries = [{"text": x[0], "text_pair": x[1]} if isinstance(x, tuple) else x for x in inputs]
        theirs = clf(queries, truncation=True, top_k=None)
        assert len(ours) == len(theirs) >= 20
        for o, t in zip(ours, theirs):
            scores = {d["label"]: d["score"] for d in t}
            assert max(scores, key=scores.get) == o["label"]
            assert all(abs(scores[lab] - p) <= 1e-4 for lab, p in o["scores"].items())


def test_multi_label_and_regression_exports(run):
    from sentence_transformers import CrossEncoder
    from transformers import pipeline

    import multitune

    _silence()
    model = multitune.load(run / "run")
    out, report = _export(run, "topics")
    assert json.loads((out / "config.json").read_text())["problem_type"] == "multi_label_classification"
    clf = pipeline("text-classification", model=str(out), trust_remote_code=report["trust_remote_code"])
    for o, t in zip(model.predict("topics", TEXTS), clf(TEXTS, top_k=None, truncation=True)):
        scores = {d["label"]: d["score"] for d in t}
        assert all(abs(scores[lab] - p) <= 1e-4 for lab, p in o["scores"].items())
    low, high = 0.0, 5.0
    for task in ("similarity_pooler", "similarity"):
        out, report = _export(run, task)
        config = json.loads((out / "config.json").read_text())
        assert config["problem_type"] == "regression" and config["multitune_label_range"] == [low, high]
        ours = [p["score"] for p in model.predict(task, PAIRS)]
        reg = pipeline("text-classification", model=str(out), trust_remote_code=report["trust_remote_code"])
        raw = [r["score"] for r in reg([{"text": a, "text_pair": b} for a, b in PAIRS], truncation=True)]
        assert all(abs(low + (high - low) * torch.sigmoid(torch.tensor(r)).item() - o) <= 1e-4
                   for r, o in zip(raw, ours))
        cross = CrossEncoder(str(out), trust_remote_code=report["trust_remote_code"])
        scores = cross.predict(PAIRS)  # sigmoid of the logit: the label range's 0-1 scale
        assert len(scores) >= 20 and all(abs(low + (high - low) * s - o) <= 1e-4 for s, o in zip(scores, ours))


def test_token_classification_export_matches_with_first_aggregation(run):
    from transformers import AutoModelForTokenClassification, pipeline

    import multitune

    _silence()
    model = multitune.load(run / "run")
    out, report = _export(run, "ner")
    assert report["model_class"] == "BertForTokenClassification" and not report["trust_remote_code"]
    _, info = AutoModelForTokenClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    sentences = [f"{n} Smith visited {p} today" for n in ["Anna", "Boris", "Carla", "Dmitri", "Elena"]
                 for p in ["Paris", "Oslo", "Lima", "Kyiv"]] + TEXTS[:4]
    tagger = pipeline("token-classification", model=str(out), aggregation_strategy="first")
    agree = 0
    for ours, theirs in zip(model.predict("ner", sentences), tagger(sentences)):
        spans = [(e["type"], e["start"], e["end"]) for e in ours["entities"]]
        agree += spans == [(e["entity_group"], e["start"], e["end"]) for e in theirs]
    assert agree == len(sentences) >= 20


def test_masked_lm_export_fills_masks_as_the_task_head(run):
    from transformers import AutoModelForMaskedLM, pipeline

    import multitune

    _silence()
    model = multitune.load(run / "run")
    out, report = _export(run, "mlm")
    assert report["model_class"] == "BertForMaskedLM"
    stock = AutoModelForMaskedLM.from_pretrained(out).eval()
    fill = pipeline("fill-mask", model=str(out), top_k=3)
    texts = [t.replace(t.split()[1], "[MASK]", 1) for t in TEXTS]
    for text, top in zip(texts, fill(texts)):
        enc = model.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = model.encode(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
            ours = model.heads["mlm"](hidden, model.input_embedding_weight()).float()
            theirs = stock(**enc).logits
        assert (ours - theirs).abs().max() <= 1e-4
        pos = enc["input_ids"][0].tolist().index(model.tokenizer.mask_token_id)
        probs = ours[0, pos].softmax(-1)
        assert [d["token"] for d in top] == probs.topk(3).indices.tolist()


def test_sentence_transformers_layout_matches_embed(tiny_backbone, tmp_path):
    """RUN/model and an encoder export load as SentenceTransformer and encode as multitune embed, for every
    pooling, with and without normalisation, including texts longer than max_length."""
    from sentence_transformers import SentenceTransformer

    import multitune

    _silence()
    files = write_toy_data(tmp_path)
    texts = TEXTS + [LONG, LONG + " and more"]
    for pooling, normalize in (("mean", False), ("cls", True), ("max", False), ("max", True)):
        root = tmp_path / f"{pooling}-{normalize}"
        raw = toy_config(files, tiny_backbone, root / "run", max_steps=2, eval_every=2)
        raw.update(pooling=pooling, normalize_embeddings=normalize)
        raw["tasks"] = {"sentiment": {**raw["tasks"]["sentiment"], "head": "pooler"}}
        multitune.train(multitune.parse_config(raw), overwrite=True, progress=False)
        ours = multitune.load(root / "run").embed_texts(texts)
        for directory in (root / "run" / "model", _export(root, "sentiment")[0]):
            theirs = torch.tensor(SentenceTransformer(str(directory)).encode(texts))
            assert len(texts) >= 20
            assert torch.nn.functional.cosine_similarity(ours, theirs).min() >= 0.99999, (pooling, directory)


def test_text2text_exports_generate_as_multitune(tiny_t5, tiny_llama, toy_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    import multitune
    from multitune.export.task import export_task

    _silence()
    sources = [f"der {t} war {p}" for t in ["film", "book", "meal", "song", "game"] for p in ["Paris", "Oslo", "Lima",
                                                                                           "Kyiv"]]
    for backbone, loader in ((tiny_t5, AutoModelForSeq2SeqLM), (tiny_llama, AutoModelForCausalLM)):
        raw = text2text_config(toy_data, backbone, tmp_path / "run", max_steps=6)
        multitune.train(multitune.parse_config(raw), overwrite=True, progress=False)
        model = multitune.load(tmp_path / "run")
        out = tmp_path / f"export-{Path(backbone).name}"
        report = export_task(tmp_path / "run", "translate", out, overwrite=True, source="final")
        params = json.loads((out / "config.json").read_text())["task_specific_params"]["translate"]
        assert params["prefix"] == "translate: "
        stock = loader.from_pretrained(out).eval()
        tok = AutoTokenizer.from_pretrained(out)
        ours = [p["text"] for p in model.predict("translate", sources, batch_size=1)]
        theirs = []
        for source in sources:
            prompt = params["prefix"] + source
            if report["pipeline_tag"] == "text-generation":
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
                ids.pop("token_type_ids", None)
                generated = stock.generate(**ids)[:, ids["input_ids"].shape[1]:]
            else:
                ids = tok(prompt, return_tensors="pt", truncation=True, return_token_type_ids=False)
                generated = stock.generate(**ids)
            theirs.append(" ".join(tok.decode(generated[0], skip_special_tokens=True).split()))
        assert ours == theirs and len(ours) >= 20


def test_stock_task_classes_never_load_a_new_head(run):
    """RUN/model is refused by every stock task class; an export's own class loads every weight, and an
    export with shipped code is refused without trust_remote_code."""
    import transformers

    _silence()
    for name in ("AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForMaskedLM",
                 "AutoModel"):
        with pytest.raises((OSError, ValueError)):
            getattr(transformers, name).from_pretrained(run / "run" / "model")
    for task, auto in (("sentiment_pooler", "AutoModelForSequenceClassification"),
                       ("similarity_pooler", "AutoModelForSequenceClassification"),
                       ("ner", "AutoModelForTokenClassification"), ("mlm", "AutoModelForMaskedLM")):
        out, _ = _export(run, task)
        _, info = getattr(transformers, auto).from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"], (task, info["missing_keys"])
    out, _ = _export(run, "sentiment")
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForSequenceClassification.from_pretrained(out)
    _, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True,
                                                                              output_loading_info=True)
    assert not info["missing_keys"]


def test_exports_stay_multitune_models(run):
    """multitune.load reads every export back with the task's predictions unchanged (an ONNX export on ONNX
    Runtime, to the last label and span)."""
    import multitune
    from multitune.export.task import export_task

    model = multitune.load(run / "run")
    export_task(run / "run", None, run / "onnx-all", overwrite=True, fmt="onnx")
    onnx_model = multitune.load(run / "onnx-all")
    assert type(onnx_model).__name__ == "OnnxMultiTaskModel"
    assert [p["label"] for p in onnx_model.predict("sentiment", TEXTS)] == \
        [p["label"] for p in model.predict("sentiment", TEXTS)]
    def spans(predictions):
        return [[(e["type"], e["start"], e["end"]) for e in p["entities"]] for p in predictions]

    assert spans(onnx_model.predict("ner", TEXTS)) == spans(model.predict("ner", TEXTS))
    for task, inputs in (("sentiment", TEXTS), ("sentiment_pooler", TEXTS), ("ner", TEXTS), ("similarity", PAIRS),
                         ("bi_similarity", PAIRS)):
        out, _ = _export(run, task)
        again = multitune.load(out)
        assert list(again.tasks) == [task]
        assert again.predict(task, inputs) == model.predict(task, inputs)


def test_export_and_run_model_cards_hold_code_that_runs(run, capsys):
    """Every usage block of an export's card (and of RUN/model's) runs as written; the Hub metadata names
    the pipeline and the task's metrics."""
    from huggingface_hub import ModelCard

    from multitune.cards import code_blocks

    _silence()
    directories = [run / "run" / "model"]
    for task in ("sentiment_pooler", "sentiment", "ner", "similarity", "mlm", "bi_similarity"):
        out, report = _export(run, task)
        card = ModelCard((out / "README.md").read_text())
        assert card.data.pipeline_tag == report["pipeline_tag"]
        assert "multitune" in card.data.tags
        directories.append(out)
    from multitune.export.task import export_task

    onnx_dir = run / "export-onnx"
    report = export_task(run / "run", None, onnx_dir, overwrite=True, fmt="onnx")
    assert report["output"] == str(onnx_dir) and (onnx_dir / "README.md").is_file()
    directories.append(onnx_dir)
    for directory in directories:
        text = (directory / "README.md").read_text()
        blocks = code_blocks(text)
        assert blocks, directory
        for code in blocks:
            exec(compile(code, f"{directory}/README.md", "exec"), {})
    assert capsys.readouterr().out.count("\n") >= len(directories)


def test_saved_head_layout_survives_defaults():
    """A model keeps the head layout it was trained with: from its saved state, or for a model saved before
    the state held it, from its config (before `auto` existed every model was `pooled` unless it said so)."""
    from multitune.tasks.classification import ClassificationConfig, ClassificationTask
    from multitune.tasks.regression import RegressionConfig, RegressionTask

    for impl, config_class in ((ClassificationTask, ClassificationConfig), (RegressionTask, RegressionConfig)):
        for setting, saved, expected in (("pooler", {}, "pooler"), ("pooled", {}, "pooled"), ("auto", {}, "pooled"),
                                         ("auto", {"head": "pooler"}, "pooler"), ("pooled", {"head": "pooler"}, "pooler")):
            task = impl("t", config_class(type="regression", head=setting, label_range=[0, 5])
                        if config_class is RegressionConfig else config_class(type="classification", head=setting))
            task.load_state({"labels": ["a", "b"], **saved})
            assert task.head_layout == expected, (impl.__name__, setting, saved)


def test_serve_answers_from_an_onnx_export(run):
    """`multitune serve` on an ONNX export: every head task over HTTP on ONNX Runtime, as the PyTorch model."""
    import httpx

    import multitune
    from multitune.export.task import export_task
    from multitune.serving import ServerSettings, create_app
    from tests.test_serving import LiveServer

    export_task(run / "run", None, run / "onnx-serve", overwrite=True, fmt="onnx")
    model = multitune.load(run / "run")
    with LiveServer(create_app(multitune.load(run / "onnx-serve"), ServerSettings(max_inputs=32))) as live:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            assert {t["name"] for t in client.get("/v1/tasks").json()["tasks"]} >= {"sentiment", "ner"}
            r = client.post("/v1/predict", json={"inputs": TEXTS, "tasks": ["sentiment", "ner"]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["sentiment"]["label"] for p in preds] == [p["label"] for p in model.predict("sentiment", TEXTS)]
    assert [[(e["type"], e["start"], e["end"]) for e in p["ner"]["entities"]] for p in preds] == \
        [[(e["type"], e["start"], e["end"]) for e in p["entities"]] for p in model.predict("ner", TEXTS)]
