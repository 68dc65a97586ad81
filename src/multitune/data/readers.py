"""Readers: one function per file format.

A reader takes the split's config and a :class:`ReadContext` and yields ``(line, record)`` pairs: the
record is a plain dict of column -> value and ``line`` its 1-based position in the file (the physical
line where a CSV row starts, the first token of a CoNLL sentence, the row number of a parquet or
``datasets`` table). :func:`multitune.data.examples.read_split` then turns records into examples with the
canonical fields (``text``, ``label``, ``source``, ``messages``, ...).

Parquet and ``datasets`` tables are read in :mod:`multitune.data.tables`: their ``ClassLabel`` columns turn into
their names, so a task sees ``"positive"`` rather than ``1``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from multitune.config.schema import FORMATS, SplitConfig
from multitune.data.tables import Record, dataset_origin, hf_table, parquet_table, table_records
from multitune.data.tables import rows_where as rows_where  # where other modules import it from
from multitune.errors import ConfigError, DataError

#: file extension -> format, for splits that do not set ``format:``
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
              ".conll": "conll", ".bio": "conll", ".iob": "conll", ".txt": "text"}


# The default limit (128 KiB) rejects long documents in a CSV cell; an unclosed quote is still caught,
# as "unexpected end of data" at the line where the row starts.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class ReadContext:
    """What a reader needs besides the split's config.

    Attributes:
        base_dir: directory that relative paths resolve against.
        split_name: ``train``, ``validation`` or ``test`` (the default split of a ``datasets`` dataset).
        field_path: config path of the split (``tasks.NAME.data.SPLIT``), for error messages.
    """

    base_dir: Path
    split_name: str
    field_path: str

    def resolve(self, spec: SplitConfig, attr: str) -> Path:
        """The readable file named by ``spec.<attr>`` (``path``, ``source_path`` or ``target_path``).

        Raises:
            ConfigError: the field is unset, or the file is missing, a directory or unreadable.
        """
        where = f"{self.field_path}.{attr}"
        value = getattr(spec, attr)
        if not value:
            raise ConfigError(where, "required field is missing (the data file)")
        path = Path(os.path.expanduser(value))
        if not path.is_absolute():
            path = self.base_dir / path
        if not path.exists():
            raise ConfigError(where, f"file not found: {path}")
        if not path.is_file():
            raise ConfigError(where, f"not a file: {path}")
        if not os.access(path, os.R_OK):
            raise ConfigError(where, f"file is not readable (permission denied): {path}")
        return path


Reader = Callable[[SplitConfig, ReadContext], Iterator[Record]]


def _encoding(spec: SplitConfig) -> str:
    # utf-8-sig reads plain UTF-8 too and drops a byte-order mark, which would otherwise end up in the
    # first column name (files saved by spreadsheet programs often start with one).
    return "utf-8-sig" if spec.encoding.lower().replace("_", "-") in ("utf-8", "utf8") else spec.encoding


def _open(path: Path, spec: SplitConfig, ctx: ReadContext, attr: str, newline: str) -> IO[str]:
    try:
        return open(path, encoding=_encoding(spec), newline=newline)
    except LookupError:
        raise ConfigError(f"{ctx.field_path}.encoding", f"unknown text encoding {spec.encoding!r}") from None
    except OSError as exc:
        raise ConfigError(f"{ctx.field_path}.{attr}", f"cannot read {path}: {exc.strerror or exc}") from None


def _decode_error(path: Path, shown: str, spec: SplitConfig, exc: UnicodeDecodeError) -> DataError:
    """Name the first line that does not decode (text is decoded in blocks, so ``exc`` has no line)."""
    encoding = _encoding(spec)
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as line_exc:
                return DataError(shown, f"not valid {spec.encoding} text ({line_exc.reason}); set encoding: to "
                                        "the file's encoding", n)
    return DataError(shown, f"not valid {spec.encoding} text ({exc.reason}); set encoding: to the file's encoding")


def _lines(spec: SplitConfig, ctx: ReadContext, attr: str = "path") -> Iterator[tuple[int, str]]:
    """The file's lines without their ending (LF or CRLF), numbered from 1.

    Lines end at LF only, so a stray carriage return inside a line neither splits it nor shifts the
    line numbers (which parallel files rely on for alignment).
    """
    path = ctx.resolve(spec, attr)
    shown = getattr(spec, attr)
    try:
        with _open(path, spec, ctx, attr, newline="\n") as fh:
            for n, line in enumerate(fh, 1):
                yield n, line.rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise _decode_error(path, shown, spec, exc) from None


def _read_delimited(spec: SplitConfig, ctx: ReadContext, fmt: str, delimiter: str, quoting: int
                    ) -> Iterator[Record]:
    if not spec.header and not spec.columns:
        raise ConfigError(f"{ctx.field_path}.columns", "required when header: false (the column names, in order)")
    path = ctx.resolve(spec, "path")
    shown = spec.path
    names = list(spec.columns) if spec.columns else None
    skip_header = spec.header
    header: list[str] | None = None
    try:
        with _open(path, spec, ctx, "path", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter, quoting=quoting, strict=quoting != csv.QUOTE_NONE)
            start = 1  # physical line where the next row starts (quoted fields may span lines)
            try:
                for row in reader:
                    line, start = start, reader.line_num + 1
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    if skip_header:
                        # With columns: given as well, the columns rename the header's names.
                        skip_header = False
                        header = row
                        names = names or [c.strip() for c in row]
                        continue
                    if len(row) != len(names):
                        hint = delimiter_hint(spec, fmt, header, row, len(names))
                        raise DataError(shown, f"expected {len(names)} fields, found {len(row)} (columns: "
                                               f"{', '.join(names)}; delimiter {delimiter!r}){hint}", line)
                    yield line, dict(zip(names, row))
            except csv.Error as exc:
                raise DataError(shown, f"malformed {fmt.upper()} row starting here: {exc}", start) from None
    except UnicodeDecodeError as exc:
        raise _decode_error(path, shown, spec, exc) from None


#: format -> (its default delimiter, how the message names it); the two formats a delimited file may be mistaken for
_DELIMITED = {"csv": (",", "commas"), "tsv": ("\t", "tabs")}


def delimiter_hint(spec: SplitConfig, fmt: str, header: Sequence[str] | None, row: Sequence[str] | None = None,
                   expected: int | None = None) -> str:
    """``"; ... set format: tsv"`` when a file read as csv looks tab-separated (and the reverse), else ``""``.

    It looks so when its header is one column holding the other format's delimiter (the file has none of
    this format's), or when splitting ``row`` at the other delimiter gives the ``expected`` number of fields
    where this one does not. Only for the format's default delimiter (a ``delimiter:`` setting is deliberate).

    Args:
        spec: the split's config.
        fmt: the format the file was read as.
        header: the header row as read (None: no header).
        row: a row whose number of fields is wrong, as read.
        expected: the number of fields that row should have (the number of columns).
    """
    if fmt not in _DELIMITED or spec.delimiter is not None:
        return ""
    other_fmt = "tsv" if fmt == "csv" else "csv"
    (used, used_name), (other, other_name) = _DELIMITED[fmt], _DELIMITED[other_fmt]
    suggestion = f"set format: {other_fmt} to read it as {other_fmt.upper()}"
    if header is not None and len(header) == 1 and other in header[0]:
        return f"; the header has {other_name} and no {used_name}: {suggestion}"
    if row is not None and expected is not None and len(row) != expected \
            and len(used.join(row).split(other)) == expected:
        return f"; split at {other_name}, this row has the {expected} fields expected: {suggestion}"
    return ""


def read_csv(spec: SplitConfig, ctx: ReadContext) -> Iterator[Record]:
    """Comma-separated values with RFC 4180 quoting (quoted fields may hold delimiters, quotes and
    newlines); CRLF or LF line endings. Values stay strings."""
    return _read_delimited(spec, ctx, "csv", spec.delimiter or ",", csv.QUOTE_MINIMAL)


def read_tsv(spec: SplitConfig, ctx: ReadContext) -> Iterator[Record]:
    """Tab-separated values. Quote characters are plain text: TSV corpora (SST-2 among them) contain
    sentences that start with a quote and are not CSV-quoted. Values stay strings."""
    return _read_delimited(spec, ctx, "tsv", spec.delimiter or "\t", csv.QUOTE_NONE)


def read_jsonl(spec: SplitConfig, ctx: ReadContext) -> Iterator[Record]:
    """JSON Lines: one object per line; values keep their JSON types (a list label, token lists)."""
    for n, line in _lines(spec, ctx):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(spec.path, f"invalid JSON: {exc.msg} (column {exc.colno}); expected one JSON "
                                       "object per line", n) from None
        if not isinstance(obj, dict):
            raise DataError(spec.path, f"expected a JSON object per line, found {type(obj).__name__}", n)
        yield n, obj


def read_parquet(spec: SplitConfig, ctx: ReadContext) -> Iterator[Record]:
    """A parquet table; the record's line is its row number (from 1). A file written by ``datasets``
    (``Dataset.to_parquet``) keeps its features in the schema: its ``ClassLabel`` columns read as names."""
    return table_records(parquet_table([ctx.resolve(spec, "path")], spec.path, all_features=False), spec.path)


def read_conll(spec: SplitConfig, ctx: ReadContext) -> Iterator[Record]:
    """CoNLL/BIO: one token per line with its tag in another column (tab- or space-separated), a blank
    line between sentences; ``-DOCSTART-`` lines are skipped. Records are ``{"tokens", "tags"}``."""
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    for n, line in _lines(spec, ctx):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                yield first, {"tokens": tokens, "tags": tags}
            tokens, tags = [], []
            continue
        # Tabs, when present, are the only separator, so that a token may contain a space.
        cols = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
        if len(cols) < 2:
            raise DataError(spec.path, f"expected a token and a tag (separated by a tab or spaces), found "
                                       f"{line!r}", n)
        try:
            token, tag = cols[spec.token_column], cols[spec.tag_column]
        except IndexError:
            raise DataError(spec.path, f"expected a token in column {spec.token_column} and a tag in column "
                                       f"{spec.tag_column}, found {len(cols)} columns in {line!r}", n) from None
        if not tag:
            raise DataError(spec.path, f"expected a token and a tag, found an empty tag in {line!r}", n)
        if not tokens:
            first = n
        tokens.append(token)
        tags.append(tag)
    if tokens:
        yield first, {"tokens": tokens, "tags": tags}


def read_text(spec: SplitConfig, ctx: ReadContext) -> Iterator[Record]:
    """Plain text: every non-blank line is one example ``{"text": line}``."""
    for n, line in _lines(spec, ctx):
        if line.strip():
            yield n, {"text": line}


def read_parallel(spec: SplitConfig, ctx: ReadContext) -> Iterator[Record]:
    """Two line-aligned files, ``source_path`` and ``target_path``: line N of one translates line N of the
    other. Blank lines are kept so the pairs stay aligned (cleaning drops empty pairs later); blank lines
    at the very end of either file are ignored."""
    sources = [line for _, line in _lines(spec, ctx, "source_path")]
    targets = [line for _, line in _lines(spec, ctx, "target_path")]
    for lines in (sources, targets):
        while lines and not lines[-1].strip():
            lines.pop()
    if len(sources) != len(targets):
        raise DataError(spec.source_path, f"has {len(sources)} lines but the target file {spec.target_path} has "
                                          f"{len(targets)}; parallel files must be line-aligned")
    for i, (source, target) in enumerate(zip(sources, targets)):
        yield i + 1, {"source": source, "target": target}


def read_hf(spec: SplitConfig, ctx: ReadContext) -> Iterator[Record]:
    """A Hugging Face ``datasets`` dataset, found by looking at ``path``: a directory written by
    ``save_to_disk`` (of a ``Dataset``, or of a ``DatasetDict``: the split ``split``, default this split's
    name), a parquet file or a folder of parquet files (split by file names as ``datasets`` does), another
    local folder that ``datasets.load_dataset`` reads, else a dataset name on the Hub (``subset``, ``split``;
    offline only from the local cache). ``dataset`` (Python API) is an in-memory ``datasets.Dataset``.
    ``ClassLabel`` columns (and lists of them) read as their names; a record's line is its row number."""
    return table_records(hf_table(spec, ctx), source_name(spec, "hf", ctx.split_name))


#: format name -> reader; every format of the config schema has one
READERS: dict[str, Reader] = {
    "csv": read_csv, "tsv": read_tsv, "jsonl": read_jsonl, "parquet": read_parquet, "conll": read_conll,
    "text": read_text, "parallel": read_parallel, "hf": read_hf,
}
if set(READERS) != set(FORMATS):  # a format added to the schema needs a reader here
    raise RuntimeError(f"data readers {sorted(READERS)} do not match config formats {sorted(FORMATS)}")


def infer_format(spec: SplitConfig, field_path: str) -> str:
    """The split's format: ``spec.format``, else ``hf`` for an in-memory dataset, else the one its file
    extension implies.

    Raises:
        ConfigError: the format is unknown, or cannot be inferred from the extension.
    """
    if spec.format:
        if spec.format not in READERS:
            raise ConfigError(f"{field_path}.format", f"unknown format {spec.format!r}; expected one of "
                                                      f"{', '.join(READERS)}")
        return spec.format
    if spec.dataset is not None:
        return "hf"
    if not spec.path:
        raise ConfigError(f"{field_path}.path", "required field is missing (the data file)")
    suffix = Path(spec.path).suffix.lower()
    if suffix not in EXTENSIONS:
        known = ", ".join(f"{ext} ({fmt})" for ext, fmt in EXTENSIONS.items())
        raise ConfigError(f"{field_path}.format", f"cannot infer the format of {spec.path!r} from its extension "
                                                  f"(known: {known}); set format: to one of {', '.join(READERS)}")
    return EXTENSIONS[suffix]


def source_name(spec: SplitConfig, fmt: str | None = None, split_name: str | None = None) -> str:
    """The file a split's examples and errors cite: its path as given (the source file if parallel), or
    ``<Dataset SPLIT>`` for an in-memory ``datasets.Dataset``.

    Args:
        spec: the split's config.
        fmt: the split's format when it was inferred (default: ``spec.format``).
        split_name: the split the config gives the data as (``train``, ``validation``, ``test``).
    """
    if spec.dataset is not None:
        return dataset_origin(split_name)
    return str(spec.source_path if (fmt or spec.format) == "parallel" else spec.path)

