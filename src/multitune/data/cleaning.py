"""Cleaning, always on and reported in counts: whitespace, empty examples, exact duplicates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from multitune.data.examples import CANONICAL_FIELDS, TEXT_FIELDS

#: fields that make an example empty when they are present but blank (a blank text_pair does not)
NON_EMPTY_FIELDS = ("text", "source", "target")


def _squeeze(value: str) -> str:
    return " ".join(value.split())


def clean_examples(examples: Sequence[dict]) -> tuple[list[dict], dict[str, int]]:
    """Normalise whitespace, then drop empty examples and exact duplicates.

    Whitespace in ``text``, ``text_pair``, ``source`` and ``target`` (string values) and in each token is
    stripped and collapsed to single spaces; a token left empty is dropped together with its tag (unless
    tokens and tags differ in length, which the task reports with the example's line). An example is
    empty when a present ``text``, ``source`` or ``target`` is blank or null, or ``tokens`` is empty. Of
    examples with the same canonical fields the first is kept. The input examples are not modified.

    Args:
        examples: examples from :func:`multitune.data.read_split`.

    Returns:
        The kept examples (new dicts, in input order) and the counts
        ``{"read": n, "empty": k, "duplicates": d, "kept": m}`` with ``n == k + d + m``.
    """
    kept: list[dict] = []
    seen: set = set()
    empty = duplicates = 0
    for original in examples:
        ex = dict(original)
        for key in TEXT_FIELDS:
            if isinstance(ex.get(key), str):
                ex[key] = _squeeze(ex[key])
        if isinstance(ex.get("tokens"), list):
            _clean_tokens(ex)
        if _is_empty(ex):
            empty += 1
            continue
        identity = tuple((k, _hashable(ex[k])) for k in CANONICAL_FIELDS if k in ex)
        if identity in seen:
            duplicates += 1
            continue
        seen.add(identity)
        kept.append(ex)
    return kept, {"read": len(examples), "empty": empty, "duplicates": duplicates, "kept": len(kept)}


def _clean_tokens(ex: dict) -> None:
    tokens = [_squeeze(t) if isinstance(t, str) else t for t in ex["tokens"]]
    tags = ex.get("tags")
    if isinstance(tags, list) and len(tags) == len(tokens):
        pairs = [(tok, tag) for tok, tag in zip(tokens, tags) if tok != ""]
        ex["tokens"], ex["tags"] = [tok for tok, _ in pairs], [tag for _, tag in pairs]
    elif tags is None:
        ex["tokens"] = [tok for tok in tokens if tok != ""]
    else:
        # Dropping tokens would hide a token/tag length mismatch the task reports; only normalise.
        ex["tokens"] = tokens


def _is_empty(ex: dict) -> bool:
    for key in NON_EMPTY_FIELDS:
        if key in ex and (ex[key] is None or (isinstance(ex[key], str) and not ex[key])):
            return True
    return "tokens" in ex and not ex["tokens"]


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, set):
        return frozenset(_hashable(v) for v in value)
    return value
