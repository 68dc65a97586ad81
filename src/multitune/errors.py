"""Errors that reach the user as one line: where the problem is and what was expected."""

from __future__ import annotations


class MultituneError(Exception):
    """Base class of every error multitune reports to a user without a traceback."""


class ConfigError(MultituneError):
    """A config field is missing, unknown, of the wrong type or out of range.

    The message starts with the dotted field path, e.g. ``tasks.ner.data.train.path: ...``.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class DataError(MultituneError):
    """A data file cannot be read or holds a bad record.

    The message starts with ``FILE:LINE:`` (or ``FILE:`` when no line applies).
    """

    def __init__(self, file: str, message: str, line: int | None = None):
        self.file = file
        self.line = line
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {message}")


class InputError(MultituneError):
    """A prediction input is malformed or does not fit a requested task (the message starts with where the
    input is: ``inputs[3]``, ``texts.jsonl:7``)."""


MAX_SHOWN_CHARS = 200


def printable(text: object) -> str:
    """``text`` safe for a terminal or a log line: control characters (escape sequences, newlines, NUL, C1
    codes) and lone surrogates are shown escaped (``\\x1b``, ``\\n``, ``\\ud800``), everything else as is."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code < 0xE000:
            out.append(ch.encode("unicode_escape").decode("ascii") if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def shown(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """A value for an error message: its ``repr`` (a string) made :func:`printable` and cut to ``limit``
    characters, so that a huge value (a YAML alias bomb, a 50 MB line) never makes a huge message."""
    if isinstance(value, (list, tuple, dict, set)) and _too_big(value, limit):
        text = f"<{type(value).__name__} of {len(value)} items>"
    else:
        text = repr(value)
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 14] + f"... ({len(text)} chars)"


def _too_big(value: object, limit: int, depth: int = 0) -> bool:
    """Whether the repr of a container may be much longer than ``limit`` (checked without building it)."""
    if depth > 3:
        return True
    items = list(value.items() if isinstance(value, dict) else value)[: limit + 1]  # type: ignore[union-attr]
    if len(items) > limit:
        return True
    for item in items:
        for part in item if isinstance(value, dict) else (item,):
            if isinstance(part, (list, tuple, dict, set)) and _too_big(part, limit, depth + 1):
                return True
            if isinstance(part, (str, bytes)) and len(part) > limit:
                return True
    return False


def shorten_message(message: str, limit: int = 2000) -> str:
    """A whole error message cut to ``limit`` characters (the last safety net before it is printed)."""
    return message if len(message) <= limit else message[: limit - 20] + f"... ({len(message)} chars)"
