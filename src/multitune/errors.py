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
