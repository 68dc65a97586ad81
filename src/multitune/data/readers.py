"""Readers: one function per file format, and :func:`read_split`, which maps columns onto example fields.

A reader takes the split's config and a :class:`ReadContext` and yields ``(line, record)`` pairs: the
record is a plain dict of column -> value and ``line`` its 1-based position in the file (the physical
line where a CSV row starts, the first token of a CoNLL sentence, the row number of a parquet or
``datasets`` table). :func:`read_split` then turns records into examples with the canonical fields
(``text``, ``text_pair``, ``label``, ``tokens``, ``tags``, ``source``, ``target``).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from multitune.config.schema import FORMATS, SplitConfig
from multitune.errors import ConfigError, DataError

CANONICAL_FIELDS = ("text", "text_pair", "label", "tokens", "tags", "source", "target")
#: canonical fields that hold one text each
TEXT_FIELDS = ("text", "text_pair", "source", "target")

#: file extension -> format, for splits that do not set ``format:``
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
              ".conll": "conll", ".bio": "conll", ".iob": "conll", ".txt": "text"}

Record = tuple[int, dict[str, Any]]

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
                        names = names or [c.strip() for c in row]
                        continue
                    if len(row) != len(names):
                        raise DataError(shown, f"expected {len(names)} fields, found {len(row)} (columns: "
                                               f"{', '.join(names)}; delimiter {delimiter!r})", line)
                    yield line, dict(zip(names, row))
            except csv.Error as exc:
                raise DataError(shown, f"malformed {fmt.upper()} row starting here: {exc}", start) from None
    except UnicodeDecodeError as exc:
        raise _decode_error(path, shown, spec, exc) from None


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
    """A parquet table; the record's line is its row number (from 1)."""
    import pyarrow.parquet as pq

    path = ctx.resolve(spec, "path")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(spec.path, f"cannot read as parquet: {' '.join(str(exc).split())[:200]}") from None
    for i, row in enumerate(rows):
        yield i + 1, row


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
    """A Hugging Face ``datasets`` dataset: ``path`` is its name (or a local script/directory), ``subset``
    its configuration and ``split`` its split (default: this split's name). Needs the network or a cache."""
    if not spec.path:
        raise ConfigError(f"{ctx.field_path}.path", "required field is missing (the dataset name)")
    try:
        import datasets

        ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split or ctx.split_name)
    except Exception as exc:  # datasets raises many types (network, missing config or split, ...)
        raise ConfigError(f"{ctx.field_path}.path", f"cannot load dataset {spec.path!r} (subset {spec.subset!r}, "
                                                    f"split {spec.split or ctx.split_name!r}): "
                                                    f"{' '.join(str(exc).split())[:300]}") from None
    for i, row in enumerate(ds):
        yield i + 1, dict(row)


#: format name -> reader; every format of the config schema has one
READERS: dict[str, Reader] = {
    "csv": read_csv, "tsv": read_tsv, "jsonl": read_jsonl, "parquet": read_parquet, "conll": read_conll,
    "text": read_text, "parallel": read_parallel, "hf": read_hf,
}
if set(READERS) != set(FORMATS):  # a format added to the schema needs a reader here
    raise RuntimeError(f"data readers {sorted(READERS)} do not match config formats {sorted(FORMATS)}")


def infer_format(spec: SplitConfig, field_path: str) -> str:
    """The split's format: ``spec.format``, else the one its file extension implies.

    Raises:
        ConfigError: the format is unknown, or cannot be inferred from the extension.
    """
    if spec.format:
        if spec.format not in READERS:
            raise ConfigError(f"{field_path}.format", f"unknown format {spec.format!r}; expected one of "
                                                      f"{', '.join(READERS)}")
        return spec.format
    if not spec.path:
        raise ConfigError(f"{field_path}.path", "required field is missing (the data file)")
    suffix = Path(spec.path).suffix.lower()
    if suffix not in EXTENSIONS:
        known = ", ".join(f"{ext} ({fmt})" for ext, fmt in EXTENSIONS.items())
        raise ConfigError(f"{field_path}.format", f"cannot infer the format of {spec.path!r} from its extension "
                                                  f"(known: {known}); set format: to one of {', '.join(READERS)}")
    return EXTENSIONS[suffix]


def source_name(spec: SplitConfig, fmt: str | None = None) -> str:
    """The file a split's examples and errors cite: its path as given (the source file if parallel).

    Args:
        spec: the split's config.
        fmt: the split's format when it was inferred (default: ``spec.format``).
    """
    return str(spec.source_path if (fmt or spec.format) == "parallel" else spec.path)


def read_split(spec: SplitConfig, base_dir: Path, split_name: str, field_path: str, fields: Sequence[str],
               required: Sequence[str]) -> list[dict]:
    """Read one split and map its columns onto the canonical fields a task uses.

    The column of canonical field ``k`` is ``spec.<k>`` when set, else ``k`` itself; optional fields
    whose default column is absent are left out of the example.

    Args:
        spec: the split's config.
        base_dir: directory that relative paths resolve against.
        split_name: ``train``, ``validation`` or ``test`` (the default split of an ``hf`` dataset).
        field_path: config path of the split (``tasks.NAME.data.SPLIT``), for error messages.
        fields: canonical fields the task reads (a subset of :data:`CANONICAL_FIELDS`).
        required: the fields that every record must have.

    Returns:
        Examples: dicts of the canonical fields found, plus ``_file`` (the path as given) and ``_line``
        (1-based line of the record in the file, or its row number for parquet and ``hf``).

    Raises:
        ConfigError: a missing or unreadable file, an unknown format, ``columns`` missing for a
            headerless CSV, a ``datasets`` dataset that does not load.
        DataError: a malformed record, a missing column, or a value not in ``target_map`` (file:line).
    """
    unknown = [k for k in fields if k not in CANONICAL_FIELDS]
    if unknown:
        raise ValueError(f"fields {unknown} are not canonical fields {CANONICAL_FIELDS}")
    fmt = infer_format(spec, field_path)
    shown = source_name(spec, fmt)
    ctx = ReadContext(Path(base_dir), split_name, field_path)
    columns = [(k, getattr(spec, k) or k, bool(getattr(spec, k)), k in required) for k in fields]
    map_key = ("target" if "target" in fields else "label") if spec.target_map is not None else None
    examples = []
    for line, record in READERS[fmt](spec, ctx):
        ex: dict[str, Any] = {}
        for key, column, explicit, needed in columns:
            if column in record:
                ex[key] = record[column]
            elif explicit:
                raise DataError(shown, f"no column {column!r} (set by {key}: {column}); columns found: "
                                       f"{_names(record)}", line)
            elif needed:
                raise DataError(shown, f"missing column {column!r}, which this task needs (map another column "
                                       f"with {key}: NAME); columns found: {_names(record)}", line)
        if map_key is not None and map_key in ex:
            ex[map_key] = _map_target(ex[map_key], spec.target_map, shown, line)
        _check_types(ex, shown, line)
        ex["_file"], ex["_line"] = shown, line
        examples.append(ex)
    return examples


def _check_types(ex: dict, file: str, line: int) -> None:
    """Texts are strings (or null), tokens and tags lists of strings: JSON, parquet and ``datasets`` records
    may hold anything, and a number or a list where a text belongs would only fail later, in the tokenizer."""
    for key in TEXT_FIELDS:
        if ex.get(key) is not None and not isinstance(ex[key], str):
            raise DataError(file, f"{key}: expected a string, got {_short(ex[key])}", line)
    for key in ("tokens", "tags"):
        value = ex.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DataError(file, f"{key}: expected a list of strings, got {_short(value)}", line)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _names(record: dict) -> str:
    return ", ".join(map(str, record)) or "none"


def _map_target(value: Any, target_map: dict[str, str], file: str, line: int) -> Any:
    if isinstance(value, list):  # multi-label: map each label
        return [_map_target(v, target_map, file, line) for v in value]
    # A label read from JSON or parquet may be the float 1.0 where the map's key is "1".
    key = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if key not in target_map:
        keys = ", ".join(repr(str(k)) for k in target_map)
        raise DataError(file, f"target value {value!r} is not in target_map (keys: {keys})", line)
    return target_map[key]
