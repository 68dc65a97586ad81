"""Vocabulary extension for domain adaptation: frequent domain words that the tokenizer splits into pieces
become tokens of their own, and each new embedding row starts as the mean of its old pieces' rows
(rather than random), so the model first reads the new token about as it read the pieces.

Words are counted as the tokenizer itself sees them (its normaliser, then its pre-tokeniser), and are added
as whole-word tokens: ``pharmacokinetics`` becomes one token, while ``pharmacokineticsxyz`` keeps its old
pieces. This fits tokenizers that split words at spaces without a space marker (WordPiece: BERT, MiniLM);
byte-level BPE and SentencePiece vocabularies, whose words carry ``Ġ`` / ``▁``, are refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tokenizers import AddedToken

from multitune.backbones.loading import load_backbone
from multitune.errors import DataError, MultituneError
from multitune.fileio import replace_dir, write_json_atomic

REPORT_FILE = "vocab_report.json"
EXAMPLES = 10


def read_corpus(path: str | Path) -> Iterator[str]:
    """Texts of a corpus file: its non-blank lines, or the ``text`` field of each line of a ``.jsonl`` file.

    The file is checked at once; its lines are read lazily, so a large corpus is never held in memory.

    Args:
        path: a UTF-8 text file, or a ``.jsonl`` file with one ``{"text": ...}`` object per line.

    Returns:
        An iterator over the texts.

    Raises:
        DataError: the file is missing or not a file (at once), or, while reading, it is not UTF-8 or a JSONL
            line is not an object with a string ``text`` field (naming the line).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "corpus file not found")
    if not path.is_file():
        raise DataError(str(path), "corpus is not a file")
    return _corpus_texts(path)


def _corpus_texts(path: Path) -> Iterator[str]:
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        # lines end at LF only, so a stray carriage return neither splits a line nor shifts the line numbers;
        # utf-8-sig drops a byte-order mark that would otherwise start the first text
        with open(path, encoding="utf-8-sig", newline="\n") as fh:
            for n, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if not jsonl:
                    yield line
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(str(path), f"invalid JSON: {exc.msg} (column {exc.colno}); expected one "
                                               "JSON object per line", n) from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(str(path), "expected an object with a string field 'text'", n)
                yield obj["text"]
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not valid UTF-8 text ({exc.reason})", _first_bad_line(path)) from None
    except OSError as exc:
        raise DataError(str(path), f"cannot read the corpus: {exc.strerror or exc}") from None


def _first_bad_line(path: Path) -> int | None:
    # text is decoded in blocks, so the decode error itself does not know its line
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return None


def _normalize(tokenizer: Any, text: str) -> str:
    normalizer = tokenizer.backend_tokenizer.normalizer
    return normalizer.normalize_str(text) if normalizer is not None else text


def _words(tokenizer: Any, text: str) -> list[str]:
    """Words as the tokenizer itself sees them: its normaliser (lowercasing, accents), then its pre-tokeniser."""
    text = _normalize(tokenizer, text)
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    if pre_tokenizer is None:
        return text.split()
    return [w for w, _ in pre_tokenizer.pre_tokenize_str(text)]


def _check_word_splitting(tokenizer: Any) -> None:
    # A byte-level BPE (GPT-2, LLaMA 3, SmolLM2) or SentencePiece tokenizer glues a space marker onto words
    # ("Ġword", "▁word"); a whole-word added token would then stand apart from the space before it, which
    # the model has never seen. Probed by behaviour rather than by the pre-tokeniser's class.
    if _words(tokenizer, "a b") != ["a", "b"]:
        raise MultituneError("vocabulary extension needs a tokenizer that splits words at spaces without a "
                             "space marker (WordPiece: BERT, MiniLM); this one marks spaces inside its tokens "
                             "(byte-level BPE or SentencePiece)")


def _pieces(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Each word's token ids on its own, without special tokens (a WordPiece word splits the same in context)."""
    if not words:
        return []
    return tokenizer(list(words), add_special_tokens=False)["input_ids"]


def find_new_words(texts: Iterable[str], tokenizer: Any, min_freq: int = 5, max_new: int = 2000
                   ) -> list[tuple[str, int]]:
    """Frequent corpus words that the tokenizer splits into two or more pieces.

    Words are counted after the tokenizer's own normaliser and pre-tokeniser, so they are lowercased and
    accent-stripped exactly when the model's input is.

    Args:
        texts: the domain corpus, e.g. :func:`read_corpus`.
        tokenizer: a transformers fast tokenizer.
        min_freq: keep words seen at least this often.
        max_new: return at most this many words.

    Returns:
        ``(word, count)`` pairs, most frequent first, ties in alphabetical order. Words already in the
        vocabulary, words without a letter (numbers, punctuation) and words seen fewer than ``min_freq``
        times are left out.

    Raises:
        MultituneError: the tokenizer marks spaces inside its tokens (byte-level BPE, SentencePiece).
        DataError: from reading ``texts`` with :func:`read_corpus`.
    """
    _check_word_splitting(tokenizer)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_words(tokenizer, text))
    vocab = tokenizer.get_vocab()
    # a word must also come out of the tokenizer unchanged, or the added token would never be matched
    candidates = sorted(((w, n) for w, n in counts.items()
                         if n >= min_freq and w not in vocab and any(c.isalpha() for c in w)
                         and _words(tokenizer, w) == [w]), key=lambda wn: (-wn[1], wn[0]))
    found: list[tuple[str, int]] = []
    chunk = 1024  # tokenised in batches, stopping once max_new words are found
    for start in range(0, len(candidates), chunk):
        batch = candidates[start:start + chunk]
        for (word, n), ids in zip(batch, _pieces(tokenizer, [w for w, _ in batch])):
            if len(ids) >= 2:
                found.append((word, n))
                if len(found) >= max_new:
                    return found
    return found


def _embedding_owners(model: Any) -> list[Any]:
    """The models whose token embeddings get resized: a warm-started ``EncoderDecoderModel`` refuses
    ``resize_token_embeddings`` itself, so its encoder and decoder are resized one by one."""
    from transformers import EncoderDecoderModel  # imported only when used: 1.7 s

    if isinstance(model, EncoderDecoderModel):
        return [model.encoder, model.decoder]
    return [model]


def _init_rows(owner: Any, new_rows: dict[int, list[int]], done: set[int]) -> None:
    """Set each new row of the input (and untied output) embeddings to the mean of its old pieces' rows."""
    matrices = [owner.get_input_embeddings().weight]
    output = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is not None:
        matrices.append(output.weight)  # skipped below when tied to the input embeddings
    if output is not None and isinstance(getattr(output, "bias", None), torch.Tensor):
        matrices.append(output.bias)  # an LM head's bias: the new token's prior follows its pieces' too
    with torch.no_grad():
        for matrix in matrices:
            if matrix.data_ptr() in done:
                continue
            done.add(matrix.data_ptr())
            for new_id, ids in new_rows.items():
                matrix[new_id] = matrix[ids].mean(dim=0)


def extend_vocabulary(model: Any, tokenizer: Any, words: Sequence[str]) -> dict:
    """Add ``words`` as tokens and start each new embedding row as the mean of its old pieces' rows.

    Each word is normalised as the tokenizer normalises text (a lowercasing tokenizer gets the lowercased
    form) and added as a normal, whole-word token: text containing the word encodes it as the one new id,
    while longer words that merely contain it keep their old pieces. The token embeddings grow to the new
    vocabulary size (never shrink: padded embedding matrices keep their spare rows); a separate, untied
    output embedding (an LM head, with its bias) is initialised the same way. Old rows are unchanged.

    Args:
        model: a transformers model (encoder, seq2seq, causal LM, or a warm-started ``EncoderDecoderModel``).
        tokenizer: its fast tokenizer; modified in place.
        words: the words to add, e.g. from :func:`find_new_words`. Words already in the vocabulary, and
            repeats, are skipped.

    Returns:
        ``{"added", "vocab_size_before", "vocab_size_after", "examples"}``; ``examples`` holds the first ten
        added words as ``{"word", "pieces"}`` with the pieces they were split into before.

    Raises:
        MultituneError: the tokenizer marks spaces inside its tokens (byte-level BPE, SentencePiece).
    """
    _check_word_splitting(tokenizer)
    before = len(tokenizer)
    vocab = tokenizer.get_vocab()
    new = [w for w in dict.fromkeys(_normalize(tokenizer, w).strip() for w in words) if w and w not in vocab]
    pieces = dict(zip(new, _pieces(tokenizer, new)))
    # normalized=True: matched in the normalised text, so "Pharmacokinetics" finds "pharmacokinetics";
    # single_word=True: not matched inside a longer word, whose tokenisation must not change
    added = tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True, special=False) for w in new])
    new_rows = {i: ids for i, ids in ((tokenizer.convert_tokens_to_ids(w), ids) for w, ids in pieces.items())
                if i >= before and ids}
    if added:
        owners = _embedding_owners(model)
        done: set[int] = set()
        for owner in owners:
            rows = owner.get_input_embeddings().weight.shape[0]
            # mean_resizing=False: every new row is overwritten below, so no sampling from the old rows
            owner.resize_token_embeddings(max(rows, len(tokenizer)), mean_resizing=False)
            _init_rows(owner, new_rows, done)
        if owners[-1] is not model:  # EncoderDecoderModel: its own config follows the decoder's
            model.config.vocab_size = owners[-1].config.vocab_size
    return {"added": added, "vocab_size_before": before, "vocab_size_after": len(tokenizer),
            "examples": [{"word": w, "pieces": tokenizer.convert_ids_to_tokens(pieces[w])} for w in new[:EXAMPLES]]}


def extend_backbone_dir(source: str, corpus: str, output: str, min_freq: int = 5, max_new: int = 2000,
                        progress: bool = True) -> dict:
    """Extend a backbone's vocabulary from a domain corpus and save it as a new model directory
    (``multitune vocab extend``).

    The model (safetensors), tokenizer and ``vocab_report.json`` (the report plus every added word with its
    count) are written to a temporary directory beside ``output`` and renamed into place, so ``output`` is
    either complete or absent.

    Args:
        source: the backbone: ``default``, a model directory or a hub id (see :func:`load_backbone`).
        corpus: the domain text, see :func:`read_corpus`.
        output: directory to create; it may exist only if empty.
        min_freq: add words seen at least this often.
        max_new: add at most this many words.
        progress: print what is being done to stderr.

    Returns:
        The report of :func:`extend_vocabulary` and ``output``.

    Raises:
        MultituneError: ``output`` exists and is not an empty directory, or the tokenizer is not supported.
        DataError: the corpus is missing or holds a bad line.
        ConfigError: the backbone cannot be loaded.
    """
    console = Console(stderr=True, quiet=not progress)
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MultituneError(f"--output: {out} exists and is not empty")
    texts = read_corpus(corpus)  # checked before the model is loaded
    model, tokenizer = load_backbone(source)
    console.print(f"counting words of {corpus}")
    words = find_new_words(texts, tokenizer, min_freq, max_new)
    report = extend_vocabulary(model, tokenizer, [w for w, _ in words])
    console.print(f"vocabulary: {report['added']} words added ({report['vocab_size_before']} -> "
                  f"{report['vocab_size_after']} tokens)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / REPORT_FILE, {**report, "source": source, "corpus": str(corpus),
                                              "min_freq": min_freq, "max_new": max_new,
                                              "words": [{"word": w, "count": n} for w, n in words]})
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(f"saved to {out}")
    return {**report, "output": str(out)}
