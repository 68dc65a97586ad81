"""Vocabulary extension: which words are added, how the tokenizer uses them and how their rows start."""

from __future__ import annotations

import json

import pytest
import torch

from multitune.backbones import load_backbone
from multitune.backbones.vocab import extend_backbone_dir, extend_vocabulary, find_new_words, read_corpus
from multitune.errors import DataError, MultituneError
from tests.conftest import write

# "pharmacokinetics" 7 times (capitalised in 6, lowercased by the tokenizer), "zygomorphic" once
CORPUS = ["the Pharmacokinetics of drugs"] * 6 + ["pharmacokinetics again", "rare zygomorphic word", "the film"]


def _pieces(tok, word: str) -> list[int]:
    return tok(word, add_special_tokens=False)["input_ids"]


def test_finds_frequent_split_words_only(tiny_backbone):
    _, tok = load_backbone(tiny_backbone)
    texts = CORPUS + ["nephrotoxicity"] * 7 + ["hepatotoxicity"] * 5 + ["12345 12345 12345 12345 12345 ...."]
    assert len(_pieces(tok, "zygomorphic")) > 1 and len(_pieces(tok, "12345")) > 1
    found = find_new_words(texts, tok, min_freq=5, max_new=10)
    # ties (7, 7) alphabetical, then by count; "the", "drugs", "of" are frequent but already tokens
    assert found == [("nephrotoxicity", 7), ("pharmacokinetics", 7), ("hepatotoxicity", 5)]
    assert find_new_words(texts, tok, min_freq=5, max_new=1) == found[:1]
    assert find_new_words(texts, tok, min_freq=8) == []


def test_new_tokens_are_used_and_rows_start_as_the_mean_of_their_pieces(tiny_backbone):
    model, tok = load_backbone(tiny_backbone)
    old = model.get_input_embeddings().weight.detach().clone()
    pieces = _pieces(tok, "pharmacokinetics")
    longer = tok.tokenize("pharmacokineticsxyz")
    assert len(pieces) > 1
    report = extend_vocabulary(model, tok, ["Pharmacokinetics", "nephrotoxicity", "pharmacokinetics", "the"])
    assert report["added"] == 2  # lowercased like the model's input; repeats and known words skipped
    assert report["vocab_size_before"] == old.shape[0] and report["vocab_size_after"] == old.shape[0] + 2
    assert report["examples"][0] == {"word": "pharmacokinetics", "pieces": tok.convert_ids_to_tokens(pieces)}
    new_id = tok.convert_tokens_to_ids("pharmacokinetics")
    assert new_id == old.shape[0]
    assert tok("The PHARMACOKINETICS of X", add_special_tokens=False)["input_ids"][1] == new_id
    assert tok.tokenize("pharmacokineticsxyz") == longer  # a whole-word token: not matched inside a longer word
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == len(tok) == model.config.vocab_size
    assert torch.allclose(emb[new_id], old[pieces].mean(dim=0))
    assert torch.equal(emb[: old.shape[0]], old)  # old rows unchanged
    assert extend_vocabulary(model, tok, ["pharmacokinetics"])["added"] == 0


def test_untied_output_embeddings_start_as_the_mean_too(tiny_backbone):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    pieces = _pieces(tok, "nephrotoxicity")
    extend_vocabulary(model, tok, ["nephrotoxicity"])
    new_id = tok.convert_tokens_to_ids("nephrotoxicity")
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.data_ptr() != new_out.data_ptr() and new_out.shape[0] == len(tok)
    assert torch.allclose(new_in[new_id], old_in[pieces].mean(dim=0))
    assert torch.allclose(new_out[new_id], old_out[pieces].mean(dim=0))
    assert torch.equal(new_out[:-1], old_out)


def test_tied_output_embeddings_stay_tied(tiny_llama):
    model, tok = load_backbone(tiny_llama)
    old = model.get_input_embeddings().weight.detach().clone()
    pieces = _pieces(tok, "nephrotoxicity")
    extend_vocabulary(model, tok, ["nephrotoxicity"])
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr() and emb.shape[0] == len(tok)
    assert torch.allclose(head[-1], old[pieces].mean(dim=0))


def test_space_marking_tokenizers_are_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(MultituneError, match="byte-level BPE or SentencePiece"):
        find_new_words(["pharmacokinetics"] * 5, tok)


def test_extend_backbone_dir_writes_a_loadable_model(tiny_backbone, tmp_path):
    corpus = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    out = tmp_path / "models" / "ext"
    report = extend_backbone_dir(tiny_backbone, str(corpus), str(out), min_freq=5, max_new=5, progress=False)
    assert report["added"] == 1 and report["vocab_size_after"] == report["vocab_size_before"] + 1
    model, tok = load_backbone(str(out))
    assert len(tok) == report["vocab_size_after"] == model.get_input_embeddings().weight.shape[0]
    assert tok.tokenize("The Pharmacokinetics") == ["the", "pharmacokinetics"]
    saved = json.loads((out / "vocab_report.json").read_text())
    assert saved["words"] == [{"word": "pharmacokinetics", "count": 7}] and saved["added"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["ext"]  # no temporary directory left behind
    with pytest.raises(MultituneError, match="exists and is not empty"):
        extend_backbone_dir(tiny_backbone, str(corpus), str(out), progress=False)


def test_bad_corpus_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: expected an object with a string field 'text'"):
        list(read_corpus(bad))
    broken = write(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": "unclosed\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        list(read_corpus(broken))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt:2: not valid UTF-8"):
        list(read_corpus(latin))
    with pytest.raises(DataError, match=r"missing.txt: corpus file not found"):
        read_corpus(tmp_path / "missing.txt")  # at once, before any model is loaded
    text = write(tmp_path / "plain.txt", "\ufefffirst line\r\n\n  second\n", newline="\n")
    assert list(read_corpus(text)) == ["first line", "  second"]


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
