"""PEFT-format exports of one task's adapter: the directory loads with the stock ``peft.AutoPeftModelFor*``
client alone (plus the label maps it records) and predicts exactly what multitune predicts, on 24 inputs per
task; tasks with no stock form are refused in one line, and nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForSequenceClassification, BertForTokenClassification

from multitune.adapters import AdapterConfig
from multitune.adapters.export import base_model_path, export_adapter
from multitune.backbones import load_backbone
from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.errors import MultituneError
from multitune.export.task import export_task
from multitune.export.task import take_weights as _take_weights
from multitune.model import MultiTaskModel
from multitune.tasks import TASKS
from multitune.training import train
from tests.conftest import text2text_config, toy_config, write_toy_data

NAMES = ["Anna", "Boris", "Carla", "Dmitri", "Elena", "Farid"]
PLACES = ["Paris", "Oslo", "Lima", "Kyiv"]
# 24 inputs of varied length; words are separated by spaces, so multitune's word split is str.split
TEXTS = [f"{NAMES[i % 6]} Smith visited {PLACES[i % 4]} today" if i % 3 == 0 else
         f"yesterday {NAMES[(i + 1) % 6]} left {PLACES[(i * 3) % 4]}" if i % 3 == 1 else
         f"the {['film', 'meal', 'hotel', 'trip'][i % 4]} was {['great', 'awful', 'dull', 'lovely'][(i // 4) % 4]} "
         f"and {NAMES[i % 6]} said so {'twice' * (i % 2)}".strip() for i in range(24)]
PAIRS = [(TEXTS[i], TEXTS[(i * 5 + 3) % 24]) for i in range(24)]
ORIGIN = {"source": "final", "step": None}
LIMIT = 1e-5


def _load(directory: Path):
    """Load an export as its README says: the auto class with the recorded label maps, and the tokenizer."""
    info = json.loads((directory / "task.json").read_text())["export"]
    kwargs = dict(info["load_kwargs"])
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(i): label for i, label in kwargs["id2label"].items()}
    model = getattr(peft, info["auto_class"]).from_pretrained(str(directory), **kwargs)
    assert model.config.id2label == kwargs.get("id2label", model.config.id2label)
    return model, AutoTokenizer.from_pretrained(directory), info


def _multitune_logits(model: MultiTaskModel, task: str, inputs: list) -> tuple[torch.Tensor, dict]:
    t = model.tasks[task]
    feats = t.encode([t.example_from_input(x) for x in inputs], model.tokenizer, model.max_length)
    batch = t.collate(feats, model.tokenizer.pad_token_id)
    with torch.no_grad():
        spec = t.export_spec()
        with model.route(task):
            return spec.logits(model, model.heads[task], batch).float(), batch


def check_head_task(model: MultiTaskModel, task: str, directory: Path, inputs: list) -> float:
    """The stock client's logits and the predictions made from them equal multitune's on every input."""
    stock, tok, info = _load(directory)
    assert not stock.training  # loads for inference: dropout off
    ours, batch = _multitune_logits(model, task, inputs)
    predictions = model.predict(task, inputs)
    n = model.max_length
    if info["task_type"] == "TOKEN_CLS":
        enc = tok([x.split() for x in inputs], is_split_into_words=True, truncation=True, max_length=n,
                  padding=True, return_tensors="pt")
        assert torch.equal(enc["input_ids"], batch["input_ids"])
        with torch.no_grad():
            theirs = stock(**enc).logits
        mask = enc["attention_mask"].bool()
        diff = float((theirs[mask] - ours[mask]).abs().max())
        id2label = stock.config.id2label
        for row, pred in enumerate(predictions):
            words, tags = enc.word_ids(row), ["O"] * len(pred["tags"])
            for pos, w in enumerate(words):
                if w is not None and (pos == 0 or words[pos - 1] != w):
                    tags[w] = id2label[int(theirs[row, pos].argmax())]
            assert tags == pred["tags"]
    else:
        first = [x[0] if isinstance(x, tuple) else x for x in inputs]
        second = [x[1] for x in inputs] if isinstance(inputs[0], tuple) else None
        enc = tok(first, second, truncation=True, max_length=n, padding=True, return_tensors="pt")
        with torch.no_grad():
            theirs = stock(**enc).logits
        diff = float((theirs - ours).abs().max())
        t = model.tasks[task]
        for row, pred in zip(theirs, predictions):
            if "score" in pred and "label" not in pred:  # regression on label_range
                lo, hi = t.config.label_range
                assert abs(lo + (hi - lo) * float(torch.sigmoid(row[0])) - pred["score"]) <= LIMIT
            elif "labels" in pred:  # multi-label
                chosen = [stock.config.id2label[i] for i, p in enumerate(torch.sigmoid(row).tolist())
                          if round(p, 6) >= t.config.threshold]
                assert chosen == pred["labels"]
            else:
                assert stock.config.id2label[int(row.argmax())] == pred["label"]
                assert torch.softmax(row, -1).tolist() == pytest.approx(list(pred["scores"].values()), abs=LIMIT)
    assert diff <= LIMIT, diff
    return diff


# -- a trained LoRA run: token classification, classification and regression with head: pooler ----------

@pytest.fixture(scope="module")
def lora_run(tiny_backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft-lora")
    data = write_toy_data(tmp)
    raw = toy_config(data, tiny_backbone, tmp / "run", learning_rate=2e-2, max_steps=8, eval_every=4)
    raw["tasks"]["sentiment"]["head"] = "pooler"
    raw["tasks"]["similarity"]["head"] = "pooler"
    raw["tasks"]["pooled"] = {**raw["tasks"]["sentiment"], "head": "pooled"}  # the default head
    raw["tasks"].pop("mlm")
    raw["adapters"] = {"method": "lora", "r": 4}
    train(parse_config(raw), progress=False)
    return {"run": tmp / "run", "tmp": tmp}


@pytest.mark.parametrize("task,inputs", [("ner", TEXTS), ("sentiment", TEXTS), ("similarity", PAIRS)])
def test_trained_lora_export_loads_alone_and_predicts_as_multitune(lora_run, tiny_backbone, task, inputs):
    out = lora_run["tmp"] / f"export-{task}"
    report = export_task(lora_run["run"], task, out)  # the task's own best step
    assert report["layout"] == "peft" and report["max_difference"] <= LIMIT and report["probes"] >= 5
    reference = MultiTaskModel.load(lora_run["run"])
    assert _take_weights(lora_run["run"], reference, task, "per-task-best")["step"] == report["step"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_backbone).resolve())
    stock_class = BertForTokenClassification if task == "ner" else BertForSequenceClassification
    assert config["task_type"] == ("TOKEN_CLS" if task == "ner" else "SEQ_CLS")
    assert "classifier" in config["modules_to_save"]
    prefix = stock_class.base_model_prefix
    if task != "ner":  # the head's dense layer is the stock class's pooler
        assert f"{prefix}.pooler" in config["modules_to_save"]
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert f"base_model.model.{prefix}.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert not any(".pooler." in k and "lora" in k for k in keys)
    assert {"tokenizer.json", "tokenizer_config.json", "task.json", "README.md"} <= set(report["files"])
    assert "head.safetensors" not in report["files"]  # the head is in the adapter, where PEFT restores it
    check_head_task(reference, task, out, inputs)


def test_default_head_is_refused_in_one_line(lora_run):
    out = lora_run["tmp"] / "export-pooled"
    with pytest.raises(MultituneError) as err:
        export_task(lora_run["run"], "pooled", out)
    message = str(err.value)
    assert "\n" not in message and "no stock transformers class" in message and "--merge" in message
    assert "head: pooler" in message
    assert not out.exists() and not out.with_name(f".{out.name}.tmp").exists()


def test_base_model_path_resolves_the_runs_backbone(lora_run, tiny_backbone):
    meta = json.loads((lora_run["run"] / "model" / "multitune.json").read_text())
    assert base_model_path(meta) == str(Path(tiny_backbone).resolve())
    assert base_model_path({"backbone_source": {"name": "org/some-model"}}) == "org/some-model"
    with pytest.raises(MultituneError, match="warm-started from two checkpoints"):
        base_model_path({"backbone_source": {"encoder": "default", "decoder": "default"}})
    with pytest.raises(MultituneError, match="no backbone_source"):
        base_model_path({})


# -- DoRA and IA3, multi-label, and refusals, on models built in memory ----------------------------------

def _memory_model(backbone_dir: str, method: str, tasks: dict[str, dict], **adapter) -> MultiTaskModel:
    """A model with trained-looking adapters and heads (random changes, so that a wrong mapping would show)."""
    backbone, tok = load_backbone(backbone_dir)
    built = {}
    for name, cfg in tasks.items():
        impl = TASKS.get(cfg["type"])
        built[name] = impl(name, from_dict(impl.config_class, cfg))
        built[name].setup([])
    config = from_dict(AdapterConfig, {"method": method, **adapter}, "adapters")
    torch.manual_seed(0)
    model = MultiTaskModel(backbone, built, tok, adapters=config, max_length=32)
    with torch.no_grad():
        for p in [*model.adapters.parameters(), *model.heads.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


HEAD_TASKS = {
    "ner": {"type": "token_classification", "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]},
    "topics": {"type": "classification", "multi_label": True, "head": "pooler", "labels": ["a", "b", "c"]},
    "score": {"type": "regression", "head": "pooler", "label_range": [1, 5]},
}


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_exports_predict_as_multitune(tiny_backbone, tmp_path, method):
    model = _memory_model(tiny_backbone, method, HEAD_TASKS)
    for task, inputs in (("ner", TEXTS), ("topics", TEXTS), ("score", TEXTS)):
        report = export_adapter(model, task, tmp_path / task, ORIGIN, tiny_backbone)
        assert report["layout"] == "peft" and report["client"].startswith(f"peft.{report['auto_class']}")
        config = json.loads((tmp_path / task / "adapter_config.json").read_text())
        assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA")
        assert config.get("use_dora", False) == (method == "dora")
        check_head_task(model, task, tmp_path / task, inputs)
    # without the label maps the stock class gets the base model's two labels and cannot take the head
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.AutoPeftModelForTokenClassification.from_pretrained(str(tmp_path / "ner"))


def test_tasks_without_a_stock_form_are_refused(tiny_backbone, tmp_path):
    model = _memory_model(tiny_backbone, "lora", {
        "bi": {"type": "regression", "encoder": "bi", "label_range": [0, 1]},
        "mlm": {"type": "masked_lm"},
        "plain": {"type": "regression", "label_range": [0, 1]}})
    for task, expected in (("bi", "PEFT has no auto class for sentence embedding tasks"),
                           ("mlm", "PEFT has no auto class for masked lm tasks"),
                           ("plain", "mean pooling -> dropout -> linear")):
        with pytest.raises(MultituneError, match=expected) as err:
            export_adapter(model, task, tmp_path / task, ORIGIN, tiny_backbone)
        assert "\n" not in str(err.value) and "--merge" in str(err.value)
        assert not any((tmp_path / task).iterdir())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(MultituneError, match="expected an empty directory"):
        export_adapter(model, "plain", tmp_path / "full", ORIGIN, tiny_backbone)


def test_an_export_that_would_predict_differently_is_never_written(tiny_backbone, tmp_path):
    """The base model named in the export differs from the run's backbone (e.g. replaced since training):
    the check against the stock client catches it."""
    model = _memory_model(tiny_backbone, "lora", {"ner": HEAD_TASKS["ner"]})
    other = tmp_path / "other-base"
    shutil.copytree(tiny_backbone, other)
    weights = load_file(str(other / "model.safetensors"))
    torch.manual_seed(1)
    weights = {k: v + 0.05 * torch.randn_like(v) if k.endswith("attention.self.key.weight") else v
               for k, v in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MultituneError, match="predicts differently from multitune") as err:
        export_adapter(model, "ner", tmp_path / "out", ORIGIN, str(other))
    assert "\n" not in str(err.value)
    with pytest.raises(MultituneError, match="cannot load the export"):
        export_adapter(model, "ner", tmp_path / "out2", ORIGIN, str(tmp_path / "missing-base"))


@pytest.mark.parametrize("method,arrangement,why", [
    ("bottleneck", "per_task", "bottleneck adapters have no PEFT equivalent"),
    ("prompt", "per_task", "keeps the virtual positions"),
    ("lora", "shared_conditioned", "task embedding"),
])
def test_methods_peft_cannot_reproduce_keep_multitunes_layout(tiny_backbone, tmp_path, method, arrangement, why):
    extra = {"num_virtual_tokens": 4} if method == "prompt" else {}
    model = _memory_model(tiny_backbone, method, {"ner": HEAD_TASKS["ner"], "score": HEAD_TASKS["score"]},
                          arrangement=arrangement, **extra)
    report = export_adapter(model, "ner", tmp_path / "out", ORIGIN, tiny_backbone)
    assert report["layout"] == "multitune" and why in report["note"] and "no stock client" in report["client"]
    files = {f.name for f in (tmp_path / "out").iterdir()}
    assert {"adapter.safetensors", "adapter_config.json", "head.safetensors", "task.json"} == files
    state = load_file(str(tmp_path / "out" / "adapter.safetensors"))
    sites = model.adapters.modules_by_site("ner")
    expected = {f"{p}.{k}": v for p, ad in sites.items() for k, v in ad.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert ("task_embedding" in state) == (arrangement == "shared_conditioned")
    head = load_file(str(tmp_path / "out" / "head.safetensors"))
    assert all(torch.equal(head[k], v) for k, v in model.heads["ner"].state_dict().items())


# -- text-to-text: the stock client generates what multitune predict generates --------------------------

@pytest.mark.parametrize("family,auto", [("tiny_t5", "AutoPeftModelForSeq2SeqLM"),
                                         ("tiny_llama", "AutoPeftModelForCausalLM")])
def test_text2text_export_generates_as_multitune(family, auto, request, tmp_path):
    backbone = request.getfixturevalue(family)
    data = write_toy_data(tmp_path)
    tasks = ("sentiment_text", "translate") if family == "tiny_t5" else ("sentiment_text",)
    raw = text2text_config(data, backbone, tmp_path / "run", tasks=tasks, max_steps=6, eval_every=6,
                           learning_rate=1e-2)
    raw["adapters"] = {"method": "lora"}
    train(parse_config(raw), progress=False)
    model = MultiTaskModel.load(tmp_path / "run")
    for task in tasks:
        out = tmp_path / f"export-{task}"
        report = export_task(tmp_path / "run", task, out, source="final")
        assert report["auto_class"] == auto and report["load_kwargs"] == {}
        stock = getattr(peft, auto).from_pretrained(str(out))  # nothing but the directory
        tok = AutoTokenizer.from_pretrained(out)
        info = json.loads((out / "task.json").read_text())["export"]
        prefix, n = raw["tasks"][task]["prefix"], model.max_length
        sources = [f"der {w} war {p}" if p[0].isupper() else f"the {w} was {p}"
                   for w in ("film", "book", "song", "trip", "meal") for p in ("great", "Oslo", "dull", "Lima")]
        if auto == "AutoPeftModelForSeq2SeqLM":
            enc = tok([prefix + s for s in sources], truncation=True, max_length=n, padding=True, return_tensors="pt")
            with torch.no_grad():
                ids = stock.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                     **info["generate_kwargs"])[:, 1:]
        else:  # the documented prompt ids, padded on the left
            prompts = [info["prompt_ids_before"] + tok(prefix + s, add_special_tokens=False, truncation=True,
                                                       max_length=n)["input_ids"] + info["prompt_ids_after"]
                       for s in sources]
            t = model.tasks[task]
            assert prompts == [f["input_ids"] for f in t.encode([{"source": s} for s in sources], tok, n)]
            width = max(map(len, prompts))
            pad = info["generate_kwargs"]["pad_token_id"]
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.no_grad():
                ids = stock.generate(input_ids=input_ids, attention_mask=mask, **info["generate_kwargs"])[:, width:]
        theirs = [" ".join(x.split()) for x in tok.batch_decode(ids, skip_special_tokens=True)]
        ours = [p["text"] for p in model.predict(task, sources)]
        assert theirs == ours
        assert len(set(ours)) > 1 or task == "sentiment_text"  # the comparison is not vacuous
