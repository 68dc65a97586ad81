"""Vocabulary extension: which words are added, how the tokenizer uses them and how their rows start."""

from __future__ import annotations

import json

import pytest
import torch

from multitune.backbones import load_backbone
from multitune.backbones.vocab import extend_backbone_dir, extend_vocabulary, find_new_words, read_corpus
from multitune.errors import DataError, MultituneError
from tests.conftest import write

CORPUS = ["the Pharmacokinetics of drugs"] * 6 + ["pharmacokinetics again", "rare zygomorphic word", "the film"] * 1


def test_finds_frequent_split_words_only(tiny_backbone):
    _, tok = load_backbone(tiny_backbone)
    texts = CORPUS + ["nephrotoxicity"] * 5 + ["12345 12345 12345 12345 12345"]
    found = find_new_words(texts, tok, min_freq=5, max_new=10)
    words = [w for w, _ in found]
    assert words[0] == "pharmacokinetics" and found[0][1] == 7  # lowercased by the tokenizer's normaliser
    assert "nephrotoxicity" in words
    assert "the" not in words and "zygomorphic" not in words and "12345" not in words  # known, rare, no letter
    assert find_new_words(texts, tok, min_freq=5, max_new=1) == found[:1]


def test_new_tokens_are_used_and_rows_start_as_the_mean_of_their_pieces(tiny_backbone):
    model, tok = load_backbone(tiny_backbone)
    old = model.get_input_embeddings().weight.detach().clone()
    pieces = tok("pharmacokinetics", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    report = extend_vocabulary(model, tok, ["pharmacokinetics", "nephrotoxicity"])
    assert report["added"] == 2 and report["vocab_size_after"] == report["vocab_size_before"] + 2
    assert report["examples"][0]["pieces"] == tok.convert_ids_to_tokens(pieces)
    new_id = tok.convert_tokens_to_ids("pharmacokinetics")
    assert tok("The Pharmacokinetics of X", add_special_tokens=False)["input_ids"][1] == new_id
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == len(tok)
    assert torch.allclose(emb[new_id], old[pieces].mean(dim=0))
    assert torch.equal(emb[: old.shape[0]], old)  # old rows unchanged


def test_extend_backbone_dir_writes_a_loadable_model(tiny_backbone, tmp_path):
    corpus = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    report = extend_backbone_dir(tiny_backbone, str(corpus), str(tmp_path / "ext"), min_freq=5, max_new=5)
    assert report["added"] == 1
    model, tok = load_backbone(str(tmp_path / "ext"))
    assert len(tok) == report["vocab_size_after"] == model.get_input_embeddings().weight.shape[0]
    assert json.loads((tmp_path / "ext" / "vocab_report.json").read_text())["words"][0]["count"] == 7
    with pytest.raises(MultituneError, match="exists and is not empty"):
        extend_backbone_dir(tiny_backbone, str(corpus), str(tmp_path / "ext"))


def test_bad_corpus_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        list(read_corpus(bad))
    with pytest.raises(DataError, match=r"missing.txt: corpus file not found"):
        list(read_corpus(tmp_path / "missing.txt"))


def test_config_and_cli_extend_the_vocabulary(tiny_backbone, toy_data, tmp_path, capsys):
    from multitune.cli import main
    from multitune.config import parse_config
    from multitune.model import load
    from multitune.training import train
    from tests.conftest import toy_config

    corpus = write(tmp_path / "domain.txt", "\n".join(CORPUS) + "\n")
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=2, eval_every=2)
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    raw["backbone"] = {"name": tiny_backbone, "extend_vocabulary": {"corpus": str(corpus), "min_freq": 5}}
    results = train(parse_config(raw), progress=False)
    assert results["vocabulary"]["added"] == 1
    assert "pharmacokinetics" in load(tmp_path / "run").tokenizer.get_vocab()
    assert main(["vocab", "extend", "--corpus", str(corpus), "--backbone", tiny_backbone,
                 "--output", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 1
    assert main(["vocab", "extend", "--corpus", str(tmp_path / "nope.txt"), "--backbone", tiny_backbone,
                 "--output", str(tmp_path / "cli2")]) == 2
    assert not (tmp_path / "cli2").exists()
