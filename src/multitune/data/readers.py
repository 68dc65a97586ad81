"""Readers: one function per file format, and :func:`read_split`, which maps columns onto example fields.

A reader takes the split's config and a :class:`ReadContext` and yields ``(line, record)`` pairs: the
record is a plain dict of column -> value and ``line`` its 1-based position in the file (the physical
line where a CSV row starts, the first token of a CoNLL sentence, the row number of a parquet or
``datasets`` table). :func:`read_split` then turns records into examples with the canonical fields
(``text``, ``text_pair``, ``label``, ``tokens``, ``tags``, ``source``, ``target``).

Data that carries ``datasets`` features (``format: hf``, an in-memory ``datasets.Dataset``, parquet written by
``datasets``) has its ``ClassLabel`` columns turned into their names, so a task sees ``"positive"`` rather
than ``1``; :func:`read_split_with_labels` also returns those names in the dataset's order.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from multitune.config.loader import missing_path_message
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
                        hint = _delimiter_hint(spec, fmt, header, row, len(names))
                        raise DataError(shown, f"expected {len(names)} fields, found {len(row)} (columns: "
                                               f"{', '.join(names)}; delimiter {delimiter!r}){hint}", line)
                    yield line, dict(zip(names, row))
            except csv.Error as exc:
                raise DataError(shown, f"malformed {fmt.upper()} row starting here: {exc}", start) from None
    except UnicodeDecodeError as exc:
        raise _decode_error(path, shown, spec, exc) from None


#: format -> (its default delimiter, how the message names it); the two formats a delimited file may be mistaken for
_DELIMITED = {"csv": (",", "commas"), "tsv": ("\t", "tabs")}


def _delimiter_hint(spec: SplitConfig, fmt: str, header: Sequence[str] | None, row: Sequence[str] | None = None,
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
    return _records(_parquet_table([ctx.resolve(spec, "path")], spec.path, all_features=False), spec.path)


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
    return _records(_hf_table(spec, ctx), source_name(spec, "hf", ctx.split_name))


@dataclass(frozen=True)
class _Table:
    """Rows of a ``datasets``-typed table: ``features`` (column -> feature type, None when unknown), the
    rows as dicts, and ``origin`` (how errors name it)."""

    features: Any
    rows: Iterable[dict]
    origin: str


_LOCAL_FORMS = "a datasets name, a directory written by save_to_disk, a parquet file or a folder of parquet files"


def _hf_table(spec: SplitConfig, ctx: ReadContext) -> _Table:
    if spec.dataset is not None:  # checked to be a datasets.Dataset when the config was parsed
        return _Table(spec.dataset.features, spec.dataset, source_name(spec, "hf", ctx.split_name))
    where = f"{ctx.field_path}.path"
    if not spec.path:
        raise ConfigError(where, f"required field is missing ({_LOCAL_FORMS})")
    path = Path(os.path.expanduser(spec.path))
    if not path.is_absolute():
        path = ctx.base_dir / path
    if not path.exists():
        if spec.path.startswith((".", "/", "~")) or os.path.isabs(spec.path):
            raise ConfigError(where, missing_path_message("not found", spec.path, ctx.base_dir,
                                                          expected=f"expected {_LOCAL_FORMS}"))
        return _hub_table(spec, ctx, spec.path)
    if not os.access(path, os.R_OK):
        raise ConfigError(where, f"not readable (permission denied): {path}")
    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    parquet_dir = path.is_dir() and not saved and any(p.is_file() for p in path.rglob("*.parquet"))
    if spec.subset is not None and (path.is_file() or saved or parquet_dir):
        raise ConfigError(f"{ctx.field_path}.subset", f"only for a Hub dataset; {path} is local data")
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ConfigError(where, f"{path} is a file but not parquet; format: hf reads {_LOCAL_FORMS} "
                                     f"(set format: to read a csv, jsonl, ... file)")
        _no_split(spec, ctx, f"{path} is one parquet file")
        return _parquet_table([path], spec.path)
    if saved:
        import datasets  # imported only when used: 0.4 s

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for a damaged directory
            raise ConfigError(where, f"cannot load {path} with datasets.load_from_disk: {_brief(exc)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, spec, ctx, f"the DatasetDict in {path}")
        else:
            _no_split(spec, ctx, f"{path} holds one Dataset, not a DatasetDict")
        return _Table(loaded.features, loaded, spec.path)
    if parquet_dir:
        return _parquet_table(_parquet_split(path, spec, ctx), spec.path)
    return _hub_table(spec, ctx, str(path))  # a folder of csv/json/... files that datasets reads itself


def _hub_table(spec: SplitConfig, ctx: ReadContext, name: str) -> _Table:
    split = spec.split or ctx.split_name
    try:
        import datasets  # imported only when used: 0.4 s

        ds = datasets.load_dataset(name, spec.subset, split=split)
    except Exception as exc:  # datasets raises many types (network, missing config or split, ...)
        raise ConfigError(f"{ctx.field_path}.path", f"cannot load dataset {name!r} (subset {spec.subset!r}, "
                                                    f"split {split!r}): {_brief(exc)}; expected {_LOCAL_FORMS} "
                                                    f"(a Hub name loads offline only from the local cache)"
                          ) from None
    return _Table(ds.features, ds, spec.path)


def _pick_split(splits: dict, spec: SplitConfig, ctx: ReadContext, origin: str) -> Any:
    name = spec.split or ctx.split_name
    if name not in splits:
        field_name = "split" if spec.split else "path"
        hint = "" if spec.split else " (set split: to one of them)"
        raise ConfigError(f"{ctx.field_path}.{field_name}", f"{origin} has no split {name!r}; its splits: "
                                                            f"{', '.join(map(str, splits))}{hint}")
    return splits[name]


def _no_split(spec: SplitConfig, ctx: ReadContext, why: str) -> None:
    if spec.split:
        raise ConfigError(f"{ctx.field_path}.split", f"{why}, so there is no split to choose; leave split out")


def _parquet_split(folder: Path, spec: SplitConfig, ctx: ReadContext) -> list[Path]:
    """The parquet files of this split in ``folder``: all of them when no file or directory name names a
    split, else those of split ``split`` (default: this split's name), found as ``datasets`` finds them."""
    # imported only when used: 0.4 s
    from datasets.data_files import DEFAULT_PATTERNS_ALL, get_data_patterns, resolve_pattern

    patterns = {str(k): v for k, v in get_data_patterns(str(folder)).items()}
    if patterns == {str(k): v for k, v in DEFAULT_PATTERNS_ALL.items()}:
        _no_split(spec, ctx, f"the parquet file names in {folder} name no splits")
        return sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    splits = {}
    for name, globs in patterns.items():
        files = sorted({Path(f) for g in globs for f in resolve_pattern(g, str(folder), [".parquet"])})
        if files:
            splits[name] = files
    return _pick_split(splits, spec, ctx, f"the parquet folder {folder}")


def _parquet_table(files: list[Path], origin: str, all_features: bool = True) -> _Table:
    """Parquet files read with pyarrow. Their features are the ``datasets`` features stored in the schema
    (``all_features``: or, without them, the plain types), else None."""
    import pyarrow.parquet as pq  # imported only when used: 0.06 s

    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            shown = origin if len(files) == 1 else str(f)
            raise DataError(shown, f"cannot read as parquet: {_brief(exc, 200)}") from None
    features = None
    schema = tables[0].schema
    if all_features or (schema.metadata and b"huggingface" in schema.metadata):
        import datasets  # imported only when used: 0.4 s

        features = datasets.Features.from_arrow_schema(schema)
    return _Table(features, (row for t in tables for row in t.to_pylist()), origin)


def _class_names(feature: Any) -> tuple[list[str], bool] | None:
    """``(names, is_list)`` of a ``ClassLabel`` feature or a list of them (``Sequence(ClassLabel)``)."""
    import datasets  # imported only when used: 0.4 s

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), False
    if isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(feature.feature, datasets.ClassLabel):
        return list(feature.feature.names), True
    return None


def _records(table: _Table, shown: str) -> Iterator[Record]:
    """The table's rows numbered from 1, with ``ClassLabel`` values replaced by their names.

    Raises:
        DataError: a value that is not a class; for missing labels (-1), how many rows have one and where.
    """
    decoders = {}
    if table.features is not None:
        decoders = {c: found for c, f in table.features.items() if (found := _class_names(f)) is not None}
    rows = enumerate(table.rows, 1)
    for line, row in rows:
        row = dict(row)
        for column, (names, is_list) in decoders.items():
            value = row.get(column)
            if value is None:
                continue
            if _missing_label(value, is_list):  # an unlabelled split: count them all, not just this row
                lines = [line] + [n for n, r in rows if _missing_label(r.get(column), is_list)]
                raise DataError(shown, f"{column}: -1 is how a ClassLabel marks a missing label (an unlabelled "
                                       f"split); {rows_where(lines, 'no label')}; expected one of "
                                       f"0..{len(names) - 1} ({_short(', '.join(names))})", line)
            row[column] = ([_class_name(v, names, column, shown, line) for v in value] if is_list
                           else _class_name(value, names, column, shown, line))
        yield line, row


def _missing_label(value: Any, is_list: bool) -> bool:
    return value is not None and (-1 in value if is_list else value == -1)


def rows_where(lines: Sequence[int], what: str, limit: int = 5) -> str:
    """``"3 rows have no label: lines 4, 9, 17"`` for the (1-based) ``lines`` of the rows that have ``what``:
    the count, and the first ``limit`` lines.

    Args:
        lines: line (or row) numbers of the bad rows, in file order.
        what: what those rows have, e.g. ``no label``.
        limit: how many line numbers to name at most.
    """
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    if len(lines) == 1:
        return f"1 row has {what}: line {lines[0]}"
    return f"{len(lines)} rows have {what}: lines {', '.join(map(str, lines[:limit]))}{more}"


def _class_name(value: Any, names: list[str], column: str, shown: str, line: int) -> str:
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    raise DataError(shown, f"{column}: {value!r} is not a class of its ClassLabel; expected one of "
                           f"0..{len(names) - 1}", line)


def _check_features(features: Any, columns: list[tuple[str, str, bool, bool]], origin: str, field_path: str,
                    check_columns: bool) -> None:
    """Config errors found from the features alone: a mapped column that is not there (``check_columns``),
    and tags that are integers without names."""
    import datasets  # imported only when used: 0.4 s

    found = ", ".join(map(str, features)) or "none"
    for key, column, explicit, needed in columns:
        if check_columns and column not in features and (explicit or needed):
            raise ConfigError(f"{field_path}.{key}",
                              f"no column {column!r} in {origin} (columns: {found})" if explicit else
                              f"this task needs a {key!r} column and {origin} has none; map one with "
                              f"{key}: COLUMN (columns: {found})")
        feature = features.get(column)
        if key == "tags" and isinstance(feature, (datasets.List, datasets.LargeList)) \
                and isinstance(feature.feature, datasets.Value) and "int" in feature.feature.dtype:
            raise ConfigError(f"{field_path}.tags", f"column {column!r} of {origin} holds integer tags without "
                                                    f"names ({feature}); expected tag strings, or a "
                                                    f"Sequence(ClassLabel(names=[...])) column that names them")


def _label_names(features: Any, columns: list[tuple[str, str, bool, bool]], target_map: dict | None,
                 map_key: str | None) -> dict[str, list[str]]:
    """Canonical field -> class names in the dataset's order, for fields read from ``ClassLabel`` columns."""
    names = {}
    for key, column, _, _ in columns:
        found = _class_names(features[column]) if column in features else None
        if found is None:
            continue
        labels = found[0]
        if target_map is not None and key == map_key:
            mapped = [target_map.get(n) for n in labels]
            if any(m is None for m in mapped):
                continue
            labels = list(dict.fromkeys(mapped))
        names[key] = labels
    return names


def _brief(exc: Exception, limit: int = 300) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


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
        return f"<Dataset {split_name}>" if split_name else "<Dataset>"
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
        Examples: dicts of the canonical fields found, plus ``_file`` (the path as given, or
        ``<Dataset SPLIT>`` for an in-memory dataset) and ``_line`` (1-based line of the record in the file,
        or its row number for parquet and ``hf``). ``ClassLabel`` values are their names.

    Raises:
        ConfigError: a missing or unreadable file, an unknown format, ``columns`` missing for a
            headerless CSV, a ``datasets`` dataset that does not load or lacks the split, a mapped column
            that a ``datasets`` dataset does not have, integer tags without names.
        DataError: a malformed record, a missing column, or a value not in ``target_map`` (file:line).
    """
    return read_split_with_labels(spec, base_dir, split_name, field_path, fields, required)[0]


def read_split_with_labels(spec: SplitConfig, base_dir: Path, split_name: str, field_path: str,
                           fields: Sequence[str], required: Sequence[str]
                           ) -> tuple[list[dict], dict[str, list[str]]]:
    """:func:`read_split`, plus the class names of the fields read from ``ClassLabel`` columns.

    Args:
        spec, base_dir, split_name, field_path, fields, required: as for :func:`read_split`.

    Returns:
        The examples, and canonical field (``label``, ``tags``, ...) -> the names of its ``ClassLabel``
        column in the dataset's order (the dataset's id2label; through ``target_map`` when that maps every
        name). Empty for data without ``datasets`` features.

    Raises:
        ConfigError, DataError: as for :func:`read_split`.
    """
    unknown = [k for k in fields if k not in CANONICAL_FIELDS]
    if unknown:
        raise ValueError(f"fields {unknown} are not canonical fields {CANONICAL_FIELDS}")
    fmt = infer_format(spec, field_path)
    shown = source_name(spec, fmt, split_name)
    ctx = ReadContext(Path(base_dir), split_name, field_path)
    columns = [(k, getattr(spec, k) or k, bool(getattr(spec, k)), k in required) for k in fields]
    map_key = ("target" if "target" in fields else "label") if spec.target_map is not None else None
    label_names: dict[str, list[str]] = {}
    if fmt in ("hf", "parquet"):  # typed tables: check columns and label types once, before the rows
        if fmt == "hf":
            table = _hf_table(spec, ctx)
        else:
            table = _parquet_table([ctx.resolve(spec, "path")], spec.path, all_features=False)
        if table.features is not None:
            _check_features(table.features, columns, shown, field_path, check_columns=fmt == "hf")
            label_names = _label_names(table.features, columns, spec.target_map, map_key)
        records = _records(table, shown)
    else:
        records = READERS[fmt](spec, ctx)
    examples = []
    for line, record in records:
        ex: dict[str, Any] = {}
        for key, column, explicit, needed in columns:
            if column in record:
                ex[key] = record[column]
            elif explicit:
                raise DataError(shown, f"no column {column!r} (set by {key}: {column}); columns found: "
                                       f"{_names(record)}{_delimiter_hint(spec, fmt, list(record))}", line)
            elif needed:
                raise DataError(shown, f"missing column {column!r}, which this task needs (map another column "
                                       f"with {key}: NAME); columns found: {_names(record)}"
                                       f"{_delimiter_hint(spec, fmt, list(record))}", line)
        if map_key is not None and map_key in ex:
            ex[map_key] = _map_target(ex[map_key], spec.target_map, shown, line)
        _check_types(ex, shown, line)
        ex["_file"], ex["_line"] = shown, line
        examples.append(ex)
    return examples, label_names


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
