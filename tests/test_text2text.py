"""Text-to-text tasks and backbone families: sequence layout, metrics, errors, and train -> generate ->
save -> reload -> predict on tiny random-init T5, BART-like, bert2bert and LLaMA-like models, mixed with a
head task in one run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from multitune.backbones.architectures import (
    IGNORE_INDEX,
    DecoderOnlyArchitecture,
    EncoderArchitecture,
    EncoderDecoderArchitecture,
)
from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.errors import ConfigError
from multitune.tasks import TASKS
from tests.conftest import text2text_config


def t2t(tokenizer=None, architecture=None, **cfg):
    cls = TASKS.get("text2text")
    task = cls("t", from_dict(cls.config_class, {"type": "text2text", **cfg}))
    if architecture is not None:
        task.bind(architecture, tokenizer)
    return task


@pytest.fixture(scope="module")
def bert_tok(tiny_backbone):
    return AutoTokenizer.from_pretrained(tiny_backbone)


def test_encoder_decoder_layout_drops_start_token_and_pads_labels(bert_tok):
    arch = EncoderDecoderArchitecture(bert_tok, type("C", (), {"decoder_start_token_id": bert_tok.cls_token_id}))
    task = t2t(bert_tok, arch, prefix="sentiment: ", max_target_length=4)
    feats = task.encode([{"source": "a fine film", "target": "positive"},
                         {"source": "dull", "target": "a b c d e f g"}], bert_tok, 16)
    src = bert_tok.convert_ids_to_tokens(feats[0]["input_ids"])
    assert src[:4] == ["[CLS]", "sentiment", ":", "a"]
    assert bert_tok.convert_ids_to_tokens(feats[0]["labels"]) == ["positive", "[SEP]"]  # no [CLS]: it starts
    assert len(feats[1]["labels"]) == 4  # max_target_length
    batch = task.collate(feats, bert_tok.pad_token_id)
    assert batch["labels"].shape == (2, 4) and batch["labels"][0, 2:].tolist() == [IGNORE_INDEX] * 2
    assert batch["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in feats]


def test_decoder_only_layout_masks_prompt_and_uses_chat_template(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert tok.chat_template
    arch = DecoderOnlyArchitecture(tok)
    task = t2t(tok, arch, prefix="sentiment: ")
    feats = task.encode([{"source": "a fine film", "target": "positive"}, {"source": "dull film here",
                                                                           "target": "negative"}], tok, 16)
    batch = task.collate(feats, tok.pad_token_id)
    row = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    text = tok.decode(row)
    assert text.startswith("user : sentiment : a fine film [SEP] assistant : positive")
    assert row[-1].item() == tok.sep_token_id  # the end token closes the target and is learned
    learned = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert tok.decode(learned) == "positive [SEP]"  # loss on the target only
    # generation inputs: the prompt alone, padded on the left, ending where the answer starts
    prompts = batch["prompt_input_ids"]
    assert (batch["prompt_attention_mask"][:, -1] == 1).all()
    assert tok.decode(prompts[0][batch["prompt_attention_mask"][0] == 1]).endswith("assistant :")
    # no chat template: prompt, newline, target
    plain = t2t(tok, DecoderOnlyArchitecture(tok), chat_template=False)
    (f,) = plain.encode([{"source": "a", "target": "b"}], tok, 16)
    assert tok.decode(f["input_ids"]) == "a b [SEP]"


def test_label_set_inferred_and_scored_like_a_classifier(bert_tok):
    task = t2t(bert_tok, EncoderDecoderArchitecture(bert_tok))
    task.setup([{"target": "positive"}] * 12 + [{"target": "negative"}] * 12)
    assert task.labels == ["negative", "positive"] and task.main_metric == "accuracy"
    golds = [{"target": "positive"}, {"target": "negative"}, {"target": "negative"}, {"target": "positive"}]
    preds = [{"text": "Positive"}, {"text": "negative"}, {"text": "positive"}, {"text": "great"}]
    m = task.compute_metrics(preds, golds)
    assert m["accuracy"] == 0.5 and m["invalid"] == 0.25 and 0 < m["macro_f1"] < 1
    free = t2t(bert_tok, EncoderDecoderArchitecture(bert_tok))
    free.setup([{"target": f"sentence number {i}"} for i in range(30)])
    assert free.labels == [] and free.main_metric == "bleu"
    assert free.lowercase  # the uncased tokenizer cannot produce capitals, so metrics compare lowercased
    refs = [{"target": "The cat sits on the mat ."}, {"target": "A dog runs in the park ."}]
    perfect = free.compute_metrics([{"text": "the cat sits on the mat ."}, {"text": "a dog runs in the park ."}],
                                   refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["exact_match"] == 1.0
    assert free.selection_score(perfect) == pytest.approx(1.0)  # on the 0-1 scale of other tasks' metrics
    worse = free.compute_metrics([{"text": "the cat sat ."}, {"text": "dogs run"}], refs)
    assert 0 <= worse["bleu"] < 50 and 0 < worse["chrf"] < perfect["chrf"]


def test_main_metric_is_chosen_by_the_config_and_chat_defaults_to_chrf(bert_tok):
    refs = [{"target": "Sunday"}, {"target": "70 millimetres"}, {"target": "1350 centimetres"}]
    hyps = [{"text": "Sunday"}, {"text": "70 millimetres"}, {"text": "135 centimetres"}]
    free = t2t(bert_tok, EncoderDecoderArchitecture(bert_tok))
    free.setup([{"target": f"sentence number {i}"} for i in range(30)])
    m = free.compute_metrics(hyps, refs)
    # answers under four words: corpus BLEU is 0 although two of three are right; chrF sees them
    assert m["bleu"] == 0.0 and m["exact_match"] == pytest.approx(2 / 3) and 80 < m["chrf"] < 100
    assert free.main_metric == "bleu" and free.selection_score(m) == 0.0
    chosen = t2t(bert_tok, EncoderDecoderArchitecture(bert_tok), metric="chrf")
    chosen.setup([{"target": f"sentence number {i}"} for i in range(30)])
    assert chosen.main_metric == "chrf" and chosen.selection_score(m) == pytest.approx(m["chrf"] / 100)
    restored = t2t(bert_tok, EncoderDecoderArchitecture(bert_tok), metric="exact_match")
    restored.load_state(chosen.state())
    assert restored.main_metric == "exact_match" and restored.selection_score(m) == pytest.approx(2 / 3)
    chat_cls = TASKS.get("chat")
    chat = chat_cls("c", from_dict(chat_cls.config_class, {"type": "chat"}))
    chat.setup([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a {i}"}]}
                for i in range(40)])
    assert chat.main_metric == "chrf" and TASKS.get("chat").main_metric_in(m) == "chrf"
    labelled = t2t(bert_tok, EncoderDecoderArchitecture(bert_tok), metric="macro_f1")
    labelled.setup([{"target": "positive"}] * 12 + [{"target": "negative"}] * 12)
    assert labelled.main_metric == "macro_f1"
    with pytest.raises(ConfigError, match=r"tasks.t.metric: bleu is not reported by a task with a label set "
                                          r"\(2 labels\); expected one of accuracy, macro_f1, exact_match"):
        t2t(bert_tok, EncoderDecoderArchitecture(bert_tok), metric="bleu").setup(
            [{"target": "positive"}] * 12 + [{"target": "negative"}] * 12)
    with pytest.raises(ConfigError, match=r"tasks.t.metric: accuracy is not reported by a free-text task"):
        t2t(bert_tok, EncoderDecoderArchitecture(bert_tok), metric="accuracy").setup(
            [{"target": f"sentence number {i}"} for i in range(30)])
    with pytest.raises(ConfigError, match=r"metric"):
        t2t(metric="rouge")


def test_text2text_refuses_an_encoder_and_masked_lm_refuses_a_decoder(bert_tok):
    with pytest.raises(ConfigError, match=r"tasks.t.type: text2text needs a generative backbone"):
        t2t(bert_tok, EncoderArchitecture(bert_tok))
    mlm = TASKS.get("masked_lm")("m", from_dict(TASKS.get("masked_lm").config_class, {"type": "masked_lm"}))
    with pytest.raises(ConfigError, match=r"masked_lm needs a bidirectional backbone"):
        mlm.bind(DecoderOnlyArchitecture(bert_tok), bert_tok)


@pytest.mark.parametrize(("section", "message"), [
    ({"name": "x", "encoder": "default", "decoder": "default"}, r"backbone.name: give either name or encoder"),
    ({"encoder": "default"}, r"backbone.decoder: required with a warm-started encoder_decoder"),
    ({"type": "decoder_only"}, r"backbone.name: required for a decoder_only backbone"),
    ({"type": "encoder", "encoder": "default", "decoder": "default"}, r"backbone.type: encoder/decoder"),
    ({"type": "encoder", "name": "default", "gguf_file": "m.gguf"}, r"backbone.gguf_file: GGUF files"),
    ({"type": "seq2seq"}, r"backbone.type: got 'seq2seq'"),
])
def test_backbone_section_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"backbone": section, "tasks": {"a": {"type": "masked_lm", "data": {"train": {"path": "x"}}}}},
                     check_files=False)


def test_backbone_shorthand_and_warm_start_default():
    cfg = parse_config({"backbone": {"type": "encoder_decoder"},
                        "tasks": {"a": {"type": "masked_lm", "data": {"train": {"path": "x"}}}}}, check_files=False)
    assert (cfg.backbone.encoder, cfg.backbone.decoder, cfg.backbone.name) == ("default", "default", None)
    cfg = parse_config({"backbone": "default", "tasks": {"a": {"type": "masked_lm",
                                                                "data": {"train": {"path": "x"}}}}}, check_files=False)
    assert cfg.backbone.name == "default" and cfg.backbone.type == "auto"


FAMILIES = {"t5": ("tiny_t5", "encoder_decoder"), "bart": ("tiny_bart", "encoder_decoder"),
            "bert2bert": ("tiny_backbone", "encoder_decoder"), "llama": ("tiny_llama", "decoder_only")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_run_on_every_family(family, request, toy_data, tmp_path):
    """Every head task type and two text2text tasks share one backbone: they train, evaluate (generating),
    save, reload with the right Auto class and predict the same outputs."""
    from multitune.model import load
    from multitune.training import train

    fixture, kind = FAMILIES[family]
    path = request.getfixturevalue(fixture)
    backbone = {"encoder": path, "decoder": path} if family == "bert2bert" else {"name": path}
    raw = text2text_config(toy_data, backbone, tmp_path / "run", tasks=("sentiment", "ner", "similarity", "sentiment_text", "translate"),
                           max_steps=6, eval_every=3, log_every=1)
    results = train(parse_config(raw), progress=False)
    val = results["validation"]
    assert set(val["sentiment_text"]) >= {"accuracy", "macro_f1", "invalid", "exact_match"}
    assert set(val["translate"]) >= {"bleu", "chrf", "exact_match"} and "accuracy" in val["sentiment"]
    assert "f1" in val["ner"] and "pearson" in val["similarity"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(v)).item() for r in losses for v in r.values())

    meta = json.loads((tmp_path / "run" / "model" / "multitune.json").read_text())
    assert meta["backbone_type"] == kind
    model = load(tmp_path / "run")
    assert model.architecture.type_name == kind
    again = load(tmp_path / "run")
    sources = ["der film war Oslo", "the song was dull"]
    out = model.predict("translate", sources)
    assert out == again.predict("translate", sources)
    assert all(isinstance(p["text"], str) for p in out)
    label = model.predict("sentiment_text", ["the film was great"])[0]
    assert set(label) == {"text", "label"} and label["label"] in (None, "negative", "positive")
    assert model.predict("sentiment", ["the film was great"])[0]["label"] in ("negative", "positive")
    assert "entities" in model.predict("ner", ["Anna Smith visited Oslo"])[0]
    assert isinstance(model.predict("similarity", [("a film", "a movie")])[0]["score"], float)


def test_text2text_learns_sentiment_as_text(tiny_t5, toy_data, tmp_path):
    """On a learnable toy set the teacher-forced loss falls and generation produces the label words."""
    from multitune.training import train

    raw = text2text_config(toy_data, tiny_t5, tmp_path / "run", tasks=("sentiment_text",), max_steps=100,
                           eval_every=100, log_every=10, learning_rate=1e-2)
    results = train(parse_config(raw), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"]["sentiment_text"] for r in rows if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert results["validation"]["sentiment_text"]["invalid"] < 0.5  # outputs are label words, not noise


def test_cli_predict_prints_generated_text(tiny_t5, toy_data, tmp_path, capsys):
    import yaml

    from multitune.cli import main

    raw = text2text_config(toy_data, tiny_t5, tmp_path / "run", tasks=("translate",), max_steps=2, eval_every=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["train", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), "--task", "translate", "Das Buch ist sehr interessant."]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert isinstance(json.loads(line)["text"], str)
