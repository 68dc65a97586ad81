"""Cleaning, on by default and reported in counts: whitespace, empty examples, exact duplicates."""

from __future__ import annotations

from collections.abc import Sequence

TEXT_FIELDS = ("text", "text_pair", "source", "target")


def _norm(value: str) -> str:
    return " ".join(value.split())


def clean_examples(examples: Sequence[dict]) -> tuple[list[dict], dict[str, int]]:
    """Strip and collapse whitespace in text fields (and in each token), drop empty examples and exact
    duplicates (the first one is kept).

    Returns:
        (kept examples, counts ``{"read", "empty", "duplicates", "kept"}``).
    """
    kept, seen = [], set()
    empty = duplicates = 0
    for ex in examples:
        ex = dict(ex)
        is_empty = False
        for key in TEXT_FIELDS:
            if key in ex and ex[key] is not None:
                ex[key] = _norm(str(ex[key]))
                if not ex[key] and key != "text_pair":
                    is_empty = True
        if "tokens" in ex and ex["tokens"] is not None:
            tags = ex.get("tags")
            pairs = [(_norm(str(t)), tags[i] if tags is not None and i < len(tags) else None)
                     for i, t in enumerate(ex["tokens"])]
            if tags is not None and len(tags) != len(ex["tokens"]):
                pairs = [(t, None) for t, _ in pairs]  # length mismatch is reported by the task, keep as is
                ex["tokens"] = [t for t, _ in pairs]
            else:
                pairs = [(t, g) for t, g in pairs if t]
                ex["tokens"] = [t for t, _ in pairs]
                if tags is not None:
                    ex["tags"] = [g for _, g in pairs]
            is_empty = is_empty or not ex["tokens"]
        if is_empty:
            empty += 1
            continue
        key = tuple((k, _freeze(ex[k])) for k in sorted(ex) if not k.startswith("_"))
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(ex)
    return kept, {"read": len(examples), "empty": empty, "duplicates": duplicates, "kept": len(kept)}


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value
