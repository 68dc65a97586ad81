"""Vocabulary extension for domain adaptation: frequent domain words that the tokenizer splits into pieces
become tokens of their own, and each new embedding row starts as the mean of its old pieces' rows
(rather than random), so the model reads the new token about as it read the pieces."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from multitune.errors import DataError, MultituneError
from multitune.fileio import replace_dir, write_json_atomic


def read_corpus(path: str | Path) -> Iterator[str]:
    """Texts of a corpus file: one per line, or the ``text`` field of each line of a ``.jsonl`` file.

    Raises:
        DataError: the file is missing or unreadable, or a JSONL line is not an object with a text field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "corpus file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if path.suffix == ".jsonl":
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(str(path), f"invalid JSON: {exc.msg}", n) from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise DataError(str(path), "expected an object with a string field 'text'", n)
                    yield obj["text"]
                elif line.strip():
                    yield line.rstrip("\n")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not UTF-8 text ({exc.reason})") from None


def _words(tokenizer: Any, text: str) -> list[str]:
    """Words as the tokenizer itself sees them: its normaliser (lowercasing, accents) then pre-tokeniser."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is None:
        return text.split()
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def _pieces(tokenizer: Any, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False)["input_ids"]


def find_new_words(texts: Iterable[str], tokenizer: Any, min_freq: int = 5, max_new: int = 2000
                   ) -> list[tuple[str, int]]:
    """Frequent corpus words that the tokenizer splits into two or more pieces.

    Args:
        texts: the domain corpus.
        tokenizer: a fast tokenizer.
        min_freq: keep words seen at least this often.
        max_new: return at most this many.

    Returns:
        ``(word, count)`` pairs, most frequent first (ties alphabetical); words already in the vocabulary,
        and words without a letter (numbers, punctuation), are skipped.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_words(tokenizer, text))
    vocab = tokenizer.get_vocab()
    found = []
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if n < min_freq:
            break
        if word in vocab or not any(c.isalpha() for c in word):
            continue
        if len(_pieces(tokenizer, word)) >= 2:
            found.append((word, n))
            if len(found) >= max_new:
                break
    return found


def extend_vocabulary(model: Any, tokenizer: Any, words: Sequence[str]) -> dict:
    """Add ``words`` as tokens and initialise their embedding rows as the mean of their old pieces' rows.

    The input embeddings are resized (``resize_token_embeddings``); a separate, untied output embedding
    (an LM head) gets the same initialisation. Old rows are unchanged.

    Returns:
        ``{"added", "vocab_size_before", "vocab_size_after", "examples"}`` (the first words with their pieces).
    """
    before = len(tokenizer)
    pieces = {w: _pieces(tokenizer, w) for w in words}
    added = tokenizer.add_tokens(list(words))
    if added:
        model.resize_token_embeddings(len(tokenizer))
        inputs = model.get_input_embeddings().weight
        outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        out_weight = None if outputs is None or outputs.weight is inputs else outputs.weight
        with torch.no_grad():
            for word, ids in pieces.items():
                new_id = tokenizer.convert_tokens_to_ids(word)
                if new_id < before or not ids:
                    continue
                inputs[new_id] = inputs[ids].mean(dim=0)
                if out_weight is not None:
                    out_weight[new_id] = out_weight[ids].mean(dim=0)
    return {"added": added, "vocab_size_before": before, "vocab_size_after": len(tokenizer),
            "examples": [{"word": w, "pieces": tokenizer.convert_ids_to_tokens(pieces[w])} for w in list(words)[:10]]}


def extend_backbone_dir(source: str, corpus: str, output: str, min_freq: int = 5, max_new: int = 2000) -> dict:
    """``multitune vocab extend``: extend a backbone's vocabulary from a corpus and save the result (model,
    tokenizer and ``vocab_report.json``) to ``output``, written beside it and renamed into place.

    Raises:
        MultituneError: ``output`` exists and is not empty. DataError / ConfigError: bad corpus or backbone.
    """
    from multitune.backbones.loading import load_backbone

    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MultituneError(f"--output: {out} exists and is not empty")
    model, tokenizer = load_backbone(source)
    words = find_new_words(read_corpus(corpus), tokenizer, min_freq, max_new)
    report = extend_vocabulary(model, tokenizer, [w for w, _ in words])
    report["words"] = [{"word": w, "count": n} for w, n in words]
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "vocab_report.json", report)
    if out.exists():
        out.rmdir()
    replace_dir(tmp, out)
    return {k: report[k] for k in ("added", "vocab_size_before", "vocab_size_after", "examples")}
