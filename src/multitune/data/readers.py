"""Readers: one function per file format, each yielding ``(line, record)`` with the record's 1-based line.

Records are plain dicts of column -> value; :func:`read_split` maps columns onto the canonical example
fields (``text``, ``text_pair``, ``label``, ``tokens``, ``tags``, ``source``, ``target``).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from multitune.config.schema import FORMATS, SplitConfig
from multitune.errors import ConfigError, DataError

CANONICAL_FIELDS = ("text", "text_pair", "label", "tokens", "tags", "source", "target")
Record = tuple[int, dict[str, Any]]

_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
               ".conll": "conll", ".bio": "conll", ".iob": "conll", ".txt": "text", ".text": "text"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _open_text(path: Path, spec: SplitConfig):
    return open(path, encoding=spec.encoding, newline="")


def _lines(path: Path, spec: SplitConfig) -> Iterator[tuple[int, str]]:
    """Lines without their ending (CRLF or LF), numbered from 1; decoding errors name the line."""
    n = 0
    try:
        with open(path, encoding=spec.encoding, newline="") as fh:
            for n, line in enumerate(fh, 1):  # noqa: B007 - n is read after the loop on decode errors
                yield n, line.rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not valid {spec.encoding} text ({exc.reason})", n + 1) from None


def read_delimited(path: Path, spec: SplitConfig, field_path: str) -> Iterator[Record]:
    """csv/tsv. CSV follows RFC 4180 quoting (embedded delimiters, quotes, newlines); TSV is read without
    quote handling, because TSV corpora (SST-2 among them) use quote characters as plain text."""
    fmt = spec.format or "csv"
    delimiter = spec.delimiter or ("\t" if fmt == "tsv" else ",")
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    if not spec.header and not spec.columns:
        raise ConfigError(f"{field_path}.columns", "required when header: false (the column names, in order)")
    try:
        with _open_text(path, spec) as fh:
            reader = csv.reader(fh, delimiter=delimiter, quoting=quoting, strict=fmt != "tsv")
            names = list(spec.columns) if spec.columns else None
            start = 1
            try:
                for row in reader:
                    line, start = start, reader.line_num + 1
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    if names is None:
                        names = [c.strip() for c in row]
                        continue
                    if len(row) != len(names):
                        raise DataError(str(path), f"expected {len(names)} fields ({', '.join(names)}), "
                                                   f"found {len(row)}", line)
                    yield line, dict(zip(names, row))
            except csv.Error as exc:
                raise DataError(str(path), f"malformed {fmt.upper()} row: {exc}", reader.line_num) from None
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not valid {spec.encoding} text ({exc.reason})") from None


def read_jsonl(path: Path, spec: SplitConfig, field_path: str) -> Iterator[Record]:
    for n, line in _lines(path, spec):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(str(path), f"invalid JSON: {exc.msg} (column {exc.colno})", n) from None
        if not isinstance(obj, dict):
            raise DataError(str(path), f"expected a JSON object, got {type(obj).__name__}", n)
        yield n, obj


def read_parquet(path: Path, spec: SplitConfig, field_path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(str(path), f"cannot read parquet: {' '.join(str(exc).split())[:200]}") from None
    yield from ((i + 1, row) for i, row in enumerate(rows))


def read_conll(path: Path, spec: SplitConfig, field_path: str) -> Iterator[Record]:
    """Token and tag columns (tab- or space-separated), a blank line between sentences; -DOCSTART- skipped."""
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    for n, line in _lines(path, spec):
        if not line.strip():
            if tokens:
                yield first, {"tokens": tokens, "tags": tags}
            tokens, tags = [], []
            continue
        if line.startswith("-DOCSTART-"):
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        cols = [c.strip() for c in cols]
        if len(cols) < 2 or not cols[spec.tag_column] or not cols[spec.token_column]:
            raise DataError(str(path), f"expected a token and a tag separated by a tab, found {line!r}", n)
        try:
            token, tag = cols[spec.token_column], cols[spec.tag_column]
        except IndexError:
            raise DataError(str(path), f"no column {spec.tag_column} in {line!r}", n) from None
        if not tokens:
            first = n
        tokens.append(token)
        tags.append(tag)
    if tokens:
        yield first, {"tokens": tokens, "tags": tags}


def read_text(path: Path, spec: SplitConfig, field_path: str) -> Iterator[Record]:
    for n, line in _lines(path, spec):
        if line.strip():
            yield n, {"text": line}


def read_parallel(path: Path | None, spec: SplitConfig, field_path: str) -> Iterator[Record]:
    """Line-aligned source and target files; blank lines are kept here so that alignment holds."""
    src = _resolve(spec.source_path, field_path + ".source_path")
    tgt = _resolve(spec.target_path, field_path + ".target_path")
    sources = [line for _, line in _lines(src, spec)]
    targets = [line for _, line in _lines(tgt, spec)]
    if len(sources) != len(targets):
        raise DataError(str(tgt), f"has {len(targets)} lines but {src} has {len(sources)}; parallel files must "
                                  "be line-aligned")
    yield from ((i + 1, {"source": s, "target": t}) for i, (s, t) in enumerate(zip(sources, targets)))


def read_hf(path: Path | None, spec: SplitConfig, field_path: str, split_name: str = "train") -> Iterator[Record]:
    """A Hugging Face ``datasets`` dataset by name (needs the network or a local cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split or split_name)
    except Exception as exc:  # datasets raises many types (network, missing config, ...)
        raise ConfigError(f"{field_path}.path", f"cannot load dataset {spec.path!r}: "
                                                f"{' '.join(str(exc).split())[:200]}") from None
    yield from ((i + 1, dict(row)) for i, row in enumerate(ds))


READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "csv": read_delimited, "tsv": read_delimited, "jsonl": read_jsonl, "parquet": read_parquet,
    "conll": read_conll, "text": read_text, "parallel": read_parallel, "hf": read_hf}
assert set(READERS) == set(FORMATS)


def _resolve(value: str | None, field: str, base_dir: Path | None = None) -> Path:
    if not value:
        raise ConfigError(field, "required field is missing")
    path = Path(value)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise ConfigError(field, f"file not found: {path}")
    if not path.is_file():
        raise ConfigError(field, f"not a file: {path}")
    return path


def infer_format(spec: SplitConfig, field_path: str) -> str:
    if spec.format:
        return spec.format
    suffix = Path(spec.path or "").suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ConfigError(f"{field_path}.format", f"cannot infer the format of {spec.path!r}; set format: to one "
                                                  f"of {', '.join(FORMATS)}")
    return _EXTENSIONS[suffix]


def read_split(spec: SplitConfig, base_dir: Path, split_name: str, field_path: str, fields: Sequence[str],
               required: Sequence[str]) -> list[dict]:
    """Read one split and map its columns onto the canonical fields a task uses.

    Args:
        spec: the split's config.
        base_dir: directory that relative paths resolve against.
        split_name: ``train``, ``validation`` or ``test`` (the default split of an hf dataset).
        field_path: config path of the split, for error messages.
        fields: canonical fields the task reads; ``required``: those that must be present.

    Returns:
        Examples with the canonical fields plus ``_file`` and ``_line`` (1-based line of the record).

    Raises:
        ConfigError: missing file, unknown format, missing ``columns``.
        DataError: a bad record, a missing column, an unmapped ``target_map`` value (file:line).
    """
    fmt = infer_format(spec, field_path)
    if fmt in ("parallel", "hf"):
        path = None
        shown = spec.target_path or spec.path or ""
    else:
        path = _resolve(spec.path, f"{field_path}.path", base_dir)
        shown = str(path)
    if fmt == "parallel":
        spec = _with_paths(spec, base_dir)
    spec_fmt = SplitConfig(**{**spec.__dict__, "format": fmt})
    records = read_hf(path, spec_fmt, field_path, split_name) if fmt == "hf" else \
        READERS[fmt](path, spec_fmt, field_path)
    examples = []
    mapping: dict[str, str] | None = None
    for line, record in records:
        if mapping is None:
            mapping = _column_mapping(record, spec, fields, required, shown, line)
        ex = {k: record.get(col) for k, col in mapping.items()}
        if spec.target_map is not None:
            key = "target" if "target" in mapping else "label"
            raw = ex.get(key)
            norm = str(int(raw)) if isinstance(raw, float) and raw.is_integer() else str(raw)
            if norm not in spec.target_map:
                raise DataError(shown, f"target value {raw!r} is not in target_map (keys: "
                                       f"{', '.join(map(str, spec.target_map))})", line)
            ex[key] = spec.target_map[norm]
        ex["_file"], ex["_line"] = shown, line
        examples.append(ex)
    return examples


def _with_paths(spec: SplitConfig, base_dir: Path) -> SplitConfig:
    def absolute(p: str | None) -> str | None:
        return str(base_dir / p) if p and not Path(p).is_absolute() else p

    return SplitConfig(**{**spec.__dict__, "source_path": absolute(spec.source_path),
                          "target_path": absolute(spec.target_path)})


def _column_mapping(record: dict, spec: SplitConfig, fields: Sequence[str], required: Sequence[str], file: str,
                    line: int) -> dict[str, str]:
    """canonical field -> source column, checked against the first record's columns."""
    mapping = {}
    found = ", ".join(map(str, record)) or "none"
    for key in fields:
        explicit = getattr(spec, key, None)
        column = explicit or key
        if column in record:
            mapping[key] = column
        elif explicit:
            raise DataError(file, f"no column {explicit!r} (set by {key}:); columns found: {found}", line)
        elif key in required:
            raise DataError(file, f"missing column {key!r} (map it with {key}: COLUMN); columns found: {found}",
                            line)
    return mapping
