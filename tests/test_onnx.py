"""ONNX export and onnxruntime inference: the graph gives PyTorch's raw outputs (|diff| <= 1e-4 in fp32) on
padded batches of varied lengths, OnnxMultiTaskModel predicts what MultiTaskModel predicts for every head
task type, one task exports alone, and what the graph cannot hold is refused with one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from multitune.config import parse_config  # noqa: E402
from multitune.errors import MultituneError  # noqa: E402
from multitune.model import MultiTaskModel  # noqa: E402
from multitune.onnx import OnnxMultiTaskModel, export_onnx, is_onnx_model_dir  # noqa: E402
from multitune.training import train  # noqa: E402
from tests.conftest import text2text_config, toy_config, write, write_toy_data  # noqa: E402

NAMES = ["Anna", "Boris", "Carla", "Dmitri", "Elena", "Farid"]
PLACES = ["Paris", "Oslo", "Lima", "Kyiv"]
WORDS = ["great", "awful", "boring", "lovely", "the", "film", "meal", "was", "and", "then", "very"]


def _texts(n: int, longest: int, seed: int) -> list[str]:
    """``n`` texts of 1 to ``longest`` words: varied lengths, so that batches are padded."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [str(w) for w in rng.choice(WORDS + NAMES + PLACES, size=1 + (i * 7) % longest)]
        out.append(" ".join(words))
    return out


TEXTS = _texts(24, 30, seed=7)  # up to the toy runs' max_length of 32 tokens
PAIRS = list(zip(_texts(24, 12, seed=8), _texts(24, 12, seed=9)[::-1]))
#: task -> its inputs (single texts or pairs)
INPUTS = {"sentiment": TEXTS, "topics": TEXTS, "ner": TEXTS, "nli": PAIRS, "similarity": PAIRS,
          "similarity_bi": PAIRS}


def _extra_data(root: Path) -> dict[str, Path]:
    pos, neg = ["great", "lovely", "superb", "fine", "wonderful"], ["awful", "dull", "poor", "bad", "boring"]
    things = ["film", "meal", "book", "song"]
    topics = ["label\tsentence"]
    nli = ["text,text_pair,label"]
    for i in range(40):
        thing, good, bad = things[i % 4], pos[(i // 4) % 5], neg[(i // 8) % 5]
        tags = ",".join(t for t, on in (("food", thing == "meal"), ("art", thing != "meal"), ("good", i % 3 == 0))
                        if on)
        topics.append(f"{tags}\tthe {thing} was {good if i % 3 == 0 else bad}")
        same = i % 3 != 0
        nli.append(f"the {thing} was {good},the {thing} was {good if same else bad},{'same' if same else 'differ'}")
    return {"topics": write(root / "topics.tsv", "\n".join(topics) + "\n"),
            "nli": write(root / "nli.csv", "\n".join(nli) + "\n")}


@pytest.fixture(scope="module")
def run(tiny_backbone, tmp_path_factory) -> Path:
    """A tiny BERT trained on one task of each head type: single / pair / multi-label classification, token
    classification, cross- and bi-encoder regression, and masked-LM (which the graph leaves out)."""
    tmp = tmp_path_factory.mktemp("onnx-run")
    data = write_toy_data(tmp / "data")
    extra = _extra_data(tmp / "data")
    raw = toy_config(data, tiny_backbone, tmp / "run", max_steps=7, eval_every=7)
    reg = raw["tasks"]["similarity"]["data"]
    raw["tasks"].update({
        "topics": {"type": "classification", "multi_label": True,
                   "data": {"train": {"path": str(extra["topics"]), "text": "sentence"}}},
        "nli": {"type": "classification", "data": {"train": {"path": str(extra["nli"])}}},
        "similarity_bi": {"type": "regression", "encoder": "bi", "label_range": [0, 5], "data": reg}})
    train(parse_config(raw), progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def model(run) -> MultiTaskModel:
    return MultiTaskModel.load(run)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx-out") / "onnx"
    return out, export_onnx(model, out)


@pytest.fixture(scope="module")
def onnx_model(exported) -> OnnxMultiTaskModel:
    return OnnxMultiTaskModel.load(exported[0], device="cpu")


def test_export_writes_one_graph_with_every_head_task(exported, model):
    import onnx

    out, report = exported
    assert is_onnx_model_dir(out) and not is_onnx_model_dir(out.parent)
    assert report["tasks"] == ["sentiment", "ner", "similarity", "topics", "nli", "similarity_bi"]
    assert list(report["excluded"]) == ["mlm"] and "labels" in report["excluded"]["mlm"]
    assert report["max_abs_diff"] <= 1e-4
    assert not [p for p in out.parent.iterdir() if p.name != "onnx"]  # no temporary directory left
    meta = json.loads((out / "onnx.json").read_text())
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["outputs"] == {"sentiment.logits": ["batch", 2], "ner.logits": ["batch", "sequence", 5],
                               "similarity.scores": ["batch"], "topics.logits": ["batch", 3],
                               "nli.logits": ["batch", 2], "sentence_embedding": ["batch", 32]}
    assert meta["tasks"]["ner"]["labels"] == model.tasks["ner"].labels
    assert meta["tasks"]["nli"]["input"] == "pair" and meta["tasks"]["sentiment"]["input"] == "text"
    assert meta["tasks"]["similarity_bi"] == {"type": "regression", "input": "pair", "computed": "embeddings",
                                              "outputs": {}, "from": "sentence_embedding"}
    saved = json.loads((out / "multitune.json").read_text())
    assert list(saved["tasks"]) == report["tasks"] and saved["pooling"] == model.pooling
    graph = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(graph)
    # one backbone pass: the embedding lookup of the input ids happens once
    gathers = [n for n in graph.graph.node if n.op_type == "Gather" and "input_ids" in n.input]
    assert len(gathers) == 1


@pytest.mark.parametrize("task", ["sentiment", "topics", "nli", "ner", "similarity"])
def test_graph_outputs_match_pytorch(model, onnx_model, task):
    """Raw outputs on 24 inputs of 1 to 30 words in padded batches of 8: within 1e-4 of PyTorch."""
    t = model.tasks[task]
    examples = [t.example_from_input(x) for x in INPUTS[task]]
    feats = t.encode(examples, model.tokenizer, model.max_length)
    worst, widths = 0.0, set()
    for start in range(0, len(feats), 8):
        batch = t.collate(feats[start:start + 8], model.tokenizer.pad_token_id)
        assert (batch["attention_mask"] == 0).any()  # padded rows in every batch
        widths.add(batch["input_ids"].shape[1])
        with torch.inference_mode():
            want = model.infer(task, batch).outputs
        got = onnx_model.run({k: v.numpy() for k, v in batch.items()}, [f"{task}.{k}" for k in want])
        for key, value in want.items():
            assert got[f"{task}.{key}"].shape == tuple(value.shape)
            worst = max(worst, float(np.abs(got[f"{task}.{key}"] - value.numpy()).max()))
    assert len(widths) > 1  # the sequence axis is dynamic
    assert worst <= 1e-4


def test_embeddings_match_pytorch(model, onnx_model):
    want, got = model.embed_texts(TEXTS, batch_size=8), onnx_model.embed_texts(TEXTS, batch_size=8)
    assert got.shape == (len(TEXTS), model.hidden_size) and got.dtype == torch.float32
    assert float((want - got).abs().max()) <= 1e-4


def _same_predictions(want: list[dict], got: list[dict]) -> None:
    """Equal answers: labels, tags, spans exactly; probabilities and scores to float precision."""
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert set(w) == set(g)
        for key, value in w.items():
            if key == "entities":
                assert [{k: v for k, v in e.items() if k != "score"} for e in g[key]] == \
                       [{k: v for k, v in e.items() if k != "score"} for e in value]
                assert [e["score"] for e in g[key]] == pytest.approx([e["score"] for e in value], abs=1e-5)
            elif key == "scores":
                assert g[key] == pytest.approx(value, abs=1e-5)
            elif key == "score":
                assert g[key] == pytest.approx(value, abs=1e-4)
            else:
                assert g[key] == value


@pytest.mark.parametrize("task", list(INPUTS))
def test_predictions_match_pytorch(model, onnx_model, task):
    want = model.predict(task, INPUTS[task], batch_size=5)
    got = onnx_model.predict(task, INPUTS[task], batch_size=5)
    _same_predictions(want, got)
    if task == "ner":
        assert any(p["entities"] for p in got)  # the spans compared are not all empty
    # input order, not length order
    assert onnx_model.predict(task, INPUTS[task][:3][::-1]) == onnx_model.predict(task, INPUTS[task][:3])[::-1]


def test_predict_mixed_matches_pytorch_and_refuses_tasks_outside_the_graph(model, onnx_model):
    requests = [(task, x) for task, xs in INPUTS.items() for x in xs[:4]]
    _same_predictions(model.predict_mixed(requests), onnx_model.predict_mixed(requests))
    with pytest.raises(MultituneError, match="task 'mlm' is not in the ONNX graph"):
        onnx_model.predict("mlm", ["a text"])
    with pytest.raises(MultituneError, match="the model has no task 'nope'; its tasks: sentiment, ner"):
        onnx_model.predict_mixed([("nope", "a text")])
    assert onnx_model.adapters is None and onnx_model.hidden_size == model.hidden_size
    assert (onnx_model.max_length, onnx_model.pooling) == (model.max_length, model.pooling)


def test_one_task_exports_alone(model, tmp_path):
    report = export_onnx(model, tmp_path / "ner", tasks=["ner"], opset=17)
    assert report["tasks"] == ["ner"] and report["excluded"] == {}
    assert report["opset"] == 17 == json.loads((tmp_path / "ner" / "onnx.json").read_text())["opset"]
    assert list(report["outputs"]) == ["ner.logits", "sentence_embedding"]
    alone = OnnxMultiTaskModel.load(tmp_path / "ner")
    assert list(alone.tasks) == ["ner"]
    _same_predictions(model.predict("ner", TEXTS), alone.predict("ner", TEXTS))
    with pytest.raises(MultituneError, match="the model has no task 'sentiment'"):
        alone.predict("sentiment", TEXTS[:1])
    # a non-empty output is only replaced on request
    with pytest.raises(MultituneError, match="is not empty; pass --overwrite to replace it"):
        export_onnx(model, tmp_path / "ner", tasks=["sentiment"])
    assert list(OnnxMultiTaskModel.load(tmp_path / "ner").tasks) == ["ner"]


def test_unknown_and_unexportable_tasks_are_refused(model, tmp_path):
    with pytest.raises(MultituneError, match=r"the model has no task 'nope'; its tasks: sentiment, ner"):
        export_onnx(model, tmp_path / "out", tasks=["nope"])
    with pytest.raises(MultituneError, match=r"task 'mlm' \(masked_lm\) cannot be exported to ONNX"):
        export_onnx(model, tmp_path / "out", tasks=["sentiment", "mlm"])
    with pytest.raises(MultituneError, match="opset: expected an integer from 17"):
        export_onnx(model, tmp_path / "out", opset=13)
    assert not any(tmp_path.iterdir())  # nothing written


def test_text2text_task_is_refused(tiny_t5, tmp_path):
    raw = text2text_config(write_toy_data(tmp_path / "data"), tiny_t5, tmp_path / "run",
                           tasks=("sentiment", "sentiment_text"), max_steps=2, eval_every=2)
    train(parse_config(raw), progress=False)
    t5 = MultiTaskModel.load(tmp_path / "run")
    with pytest.raises(MultituneError, match=r"task 'sentiment_text' \(text2text\) cannot be exported to ONNX: "
                                             r"it generates text"):
        export_onnx(t5, tmp_path / "out", tasks=["sentiment_text"])
    with pytest.raises(MultituneError, match="ONNX export covers encoder backbones; this model's backbone is "
                                             "encoder_decoder"):
        export_onnx(t5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapters_export_merged_and_cheaper_precisions_are_refused(toy_data, tiny_backbone, tmp_path, run):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "lora", max_steps=2, eval_every=2)
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    raw["adapters"] = {"method": "lora"}
    train(parse_config(raw), progress=False)
    lora = MultiTaskModel.load(tmp_path / "lora")
    with pytest.raises(MultituneError, match=r"adapters merged into the backbone: export one task merged "
                                             r"\(multitune export RUN --task T --merge --format onnx"):
        export_onnx(lora, tmp_path / "out")
    with pytest.raises(MultituneError, match="needs the model in fp32"):
        export_onnx(MultiTaskModel.load(run, precision="bf16"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the supported path: the task's LoRA folded into the backbone weights, then exported
    want = lora.predict("sentiment", TEXTS)
    lora.adapters.remove_hooks()
    lora.adapters.merge_into(lora.backbone, "sentiment")
    lora.adapters = None
    export_onnx(lora, tmp_path / "merged")
    _same_predictions(want, OnnxMultiTaskModel.load(tmp_path / "merged").predict("sentiment", TEXTS))


def test_missing_extra_and_bad_directories_give_one_line(onnx_model, exported, tmp_path, monkeypatch):
    out, _ = exported
    with pytest.raises(MultituneError, match="an ONNX model runs in fp32"):
        OnnxMultiTaskModel.load(out, precision="bf16")
    with pytest.raises(MultituneError, match="device: expected cpu or cuda"):
        OnnxMultiTaskModel.load(out, device="mps")
    with pytest.raises(MultituneError, match="not an ONNX model directory .missing model.onnx, onnx.json"):
        OnnxMultiTaskModel.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "onnx.json").write_text("{\n  \"format\": ", encoding="utf-8")
    with pytest.raises(MultituneError, match=r"onnx.json:2: invalid JSON"):
        OnnxMultiTaskModel.load(broken)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MultituneError, match=r"pip install 'multitune\[onnx\]'"):
        OnnxMultiTaskModel.load(out)
