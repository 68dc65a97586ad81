"""Checks of a request's inputs before they join a model batch, and of the predictions before they are sent.

Every text must be encodable as UTF-8 (JSON can carry a lone surrogate such as ``"\\ud800"``, which no
tokenizer reads) and must go through the model's tokenizer. An input that fails is the request's own 422,
naming it (``inputs[3].text_pair: ...``); it never reaches a batch, so it never fails other clients'
requests. A prediction holding NaN or an infinity is not valid JSON: :func:`first_non_finite` finds it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import numbers
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger("multitune.serving")


def _texts(inputs: Sequence[tuple[str, str | None]]) -> list[tuple[str, str]]:
    """``(where, text)`` for every text of the (normalised) inputs, ``where`` as ``inputs[i]`` or
    ``inputs[i].text_pair``."""
    out = []
    for i, (text, pair) in enumerate(inputs):
        if pair is None:
            out.append((f"inputs[{i}]", text))
        else:
            out += [(f"inputs[{i}].text", text), (f"inputs[{i}].text_pair", pair)]
    return out


def too_long(inputs: Sequence[tuple[str, str | None]], limit: int) -> str | None:
    """The first text longer than ``limit`` characters, as an error message, or None."""
    for where, text in _texts(inputs):
        if len(text) > limit:
            return f"{where}: {len(text)} characters; at most {limit} (--max-chars)"
    return None


def not_utf8(inputs: Sequence[tuple[str, str | None]]) -> str | None:
    """The first text that cannot be encoded as UTF-8 (a lone surrogate), as an error message, or None."""
    for where, text in _texts(inputs):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"{where}: not valid Unicode: a lone surrogate {exc.object[exc.start]!r} at character "
                    f"{exc.start} (a \\uD800-\\uDFFF escape in the JSON that is not half of a pair)")
    return None


class TokenizerCheck:
    """Runs each request's texts through a copy of the model's tokenizer, in a thread of its own.

    The copy keeps the check from sharing the tokenizer with the model thread (a fast tokenizer may refuse
    to be used by two threads at once), and the thread keeps a long request (64 texts of 4,000 characters
    take ~0.1 s) from holding up the event loop.

    Args:
        tokenizer: the model's tokenizer, or None (no check).
        max_length: the model's ``max_length`` (the check truncates as the model does, so that it warns of
            nothing).
    """

    def __init__(self, tokenizer: Any, max_length: int | None):
        self.tokenizer = None
        self.max_length = max_length
        if tokenizer is not None:
            try:
                self.tokenizer = copy.deepcopy(tokenizer)
            except Exception as exc:  # a tokenizer that cannot be copied: texts are still checked as UTF-8
                logger.warning("inputs are not checked with the tokenizer (it cannot be copied: %s)",
                               type(exc).__name__)
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self.tokenizer is not None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="multitune-check")

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def first_error(self, inputs: Sequence[tuple[str, str | None]]) -> str | None:
        """The first text of ``inputs`` that the tokenizer fails on, as an error message, or None."""
        if self._executor is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._check, _texts(inputs))

    def _check(self, texts: list[tuple[str, str]]) -> str | None:
        try:
            self._tokenize([t for _, t in texts])
            return None
        except Exception:
            pass
        for where, text in texts:  # only when the whole list failed: which text is it?
            try:
                self._tokenize([text])
            except Exception as exc:
                return f"{where}: the model's tokenizer cannot read this text ({type(exc).__name__}: {exc})"
        return None

    def _tokenize(self, texts: list[str]) -> None:
        kwargs = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        self.tokenizer(texts, add_special_tokens=False, **kwargs)


def first_non_finite(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinity in a prediction (``sentiment.scores.positive``), or None."""
    if isinstance(value, numbers.Real):  # float, int, numpy scalars
        return None if math.isfinite(value) else path or "value"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        key = str(key)
        found = first_non_finite(item, key if not path else path + (key if key.startswith("[") else f".{key}"))
        if found is not None:
            return found
    return None
