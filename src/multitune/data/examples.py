"""From records to examples: :func:`read_split` reads one split with its format's reader and maps its columns
onto the canonical fields a task reads (``text``, ``label``, ``source``, ``messages``, ...), checking their types
with the file and line of every bad record."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multitune.config.schema import SplitConfig
from multitune.data.readers import READERS, ReadContext, delimiter_hint, infer_format, source_name
from multitune.data.tables import (
    check_features,
    class_label_names,
    hf_table,
    parquet_table,
    short,
    table_records,
)
from multitune.errors import ConfigError, DataError

CANONICAL_FIELDS = ("text", "text_pair", "label", "tokens", "tags", "source", "target",
                    "messages", "instruction", "input", "output")
#: canonical fields that hold one text each (whitespace is normalised when examples are cleaned)
TEXT_FIELDS = ("text", "text_pair", "source", "target")
#: canonical fields of instruction data that hold one text each, kept as written (line breaks may matter)
INSTRUCTION_FIELDS = ("instruction", "input", "output")
#: the example key that holds a row's value in the split's ``split_by`` column
SPLIT_BY_KEY = "_split_by"
#: formats whose records have fixed fields rather than named columns
COLUMNLESS_FORMATS = ("conll", "text", "parallel")



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
        or its row number for parquet and ``hf``). ``ClassLabel`` values are their names. With ``split_by``
        set, each example also holds its row's value in that column under :data:`SPLIT_BY_KEY`. A ``messages``
        value given as a JSON string (e.g. a CSV cell) is parsed.

    Raises:
        ConfigError: a missing or unreadable file, an unknown format, ``columns`` missing for a
            headerless CSV, a ``datasets`` dataset that does not load or lacks the split, a mapped column
            that a ``datasets`` dataset does not have, integer tags without names, ``split_by`` on a
            format without named columns.
        DataError: a malformed record, a missing column, a value of the wrong type (a text that is not a
            string, ``messages`` that are not JSON), or a value not in ``target_map`` (file:line).
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
    if spec.split_by and fmt in COLUMNLESS_FORMATS:
        raise ConfigError(f"{field_path}.split_by", f"format {fmt} has no named columns to split by; give the "
                                                    f"tasks' rows in a csv, tsv, jsonl, parquet or hf file")
    shown = source_name(spec, fmt, split_name)
    ctx = ReadContext(Path(base_dir), split_name, field_path)
    columns = [(k, getattr(spec, k) or k, bool(getattr(spec, k)), k in required) for k in fields]
    # the split_by column is read like a mapped field (it must be there), under its own key
    grouping = [("split_by", spec.split_by, True, True)] if spec.split_by else []
    map_key = ("target" if "target" in fields else "label") if spec.target_map is not None else None
    label_names: dict[str, list[str]] = {}
    if fmt in ("hf", "parquet"):  # typed tables: check columns and label types once, before the rows
        if fmt == "hf":
            table = hf_table(spec, ctx)
        else:
            table = parquet_table([ctx.resolve(spec, "path")], spec.path, all_features=False)
        if table.features is not None:
            check_features(table.features, columns + grouping, shown, field_path, check_columns=fmt == "hf")
            label_names = class_label_names(table.features, columns, spec.target_map, map_key)
        records = table_records(table, shown)
    else:
        records = READERS[fmt](spec, ctx)
    examples = []
    for line, record in records:
        ex: dict[str, Any] = {}
        for key, column, explicit, needed in columns + grouping:
            if column in record:
                ex[SPLIT_BY_KEY if key == "split_by" else key] = record[column]
            elif explicit:
                raise DataError(shown, f"no column {column!r} (set by {key}: {column}); columns found: "
                                       f"{_names(record)}{delimiter_hint(spec, fmt, list(record))}", line)
            elif needed:
                raise DataError(shown, f"missing column {column!r}, which this task needs (map another column "
                                       f"with {key}: NAME); columns found: {_names(record)}"
                                       f"{delimiter_hint(spec, fmt, list(record))}", line)
        if map_key is not None and map_key in ex:
            ex[map_key] = _map_target(ex[map_key], spec.target_map, shown, line)
        _check_types(ex, shown, line)
        ex["_file"], ex["_line"] = shown, line
        examples.append(ex)
    return examples, label_names


def _check_types(ex: dict, file: str, line: int) -> None:
    """Texts are strings (or null), tokens and tags lists of strings: JSON, parquet and ``datasets`` records
    may hold anything, and a number or a list where a text belongs would only fail later, in the tokenizer.
    ``messages`` given as a JSON string (a CSV or TSV cell) is parsed here; its structure is the task's to
    check (:mod:`multitune.tasks.chat`)."""
    for key in TEXT_FIELDS + INSTRUCTION_FIELDS:
        if ex.get(key) is not None and not isinstance(ex[key], str):
            raise DataError(file, f"{key}: expected a string, got {short(ex[key])}", line)
    if isinstance(ex.get("messages"), str):
        try:
            ex["messages"] = json.loads(ex["messages"])
        except json.JSONDecodeError as exc:
            raise DataError(file, f"messages: a text that is not a JSON list of messages ({exc.msg}, column "
                                  f"{exc.colno}): {short(ex['messages'])}", line) from None
    for key in ("tokens", "tags"):
        value = ex.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DataError(file, f"{key}: expected a list of strings, got {short(value)}", line)


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
