"""Typed tables: parquet files and Hugging Face ``datasets`` data (``format: hf``, ``format: parquet``, an in-memory
``datasets.Dataset``), read as rows numbered from 1 whose ``ClassLabel`` values are their names.

:mod:`multitune.data.readers` wraps these as the ``parquet`` and ``hf`` readers; :mod:`multitune.data.examples`
checks a table's columns and label types from its features before it reads the rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitune.config.loader import missing_path_message
from multitune.config.schema import SplitConfig
from multitune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from multitune.data.readers import ReadContext

Record = tuple[int, dict[str, Any]]


def dataset_origin(split_name: str | None) -> str:
    """How examples and errors cite an in-memory ``datasets.Dataset``: ``<Dataset SPLIT>``."""
    return f"<Dataset {split_name}>" if split_name else "<Dataset>"


@dataclass(frozen=True)
class Table:
    """Rows of a ``datasets``-typed table: ``features`` (column -> feature type, None when unknown), the
    rows as dicts, and ``origin`` (how errors name it)."""

    features: Any
    rows: Iterable[dict]
    origin: str


_LOCAL_FORMS = "a datasets name, a directory written by save_to_disk, a parquet file or a folder of parquet files"


def hf_table(spec: SplitConfig, ctx: ReadContext) -> Table:
    """The table of a ``format: hf`` split (see :func:`multitune.data.readers.read_hf` for what ``path`` may be).

    Raises:
        ConfigError: the path is missing or unreadable, names no dataset that loads, or lacks the split;
            ``subset`` or ``split`` where they do not apply.
    """
    if spec.dataset is not None:  # checked to be a datasets.Dataset when the config was parsed
        return Table(spec.dataset.features, spec.dataset, dataset_origin(ctx.split_name))
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
        return parquet_table([path], spec.path)
    if saved:
        import datasets  # imported only when used: 0.4 s

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for a damaged directory
            raise ConfigError(where, f"cannot load {path} with datasets.load_from_disk: {brief(exc)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, spec, ctx, f"the DatasetDict in {path}")
        else:
            _no_split(spec, ctx, f"{path} holds one Dataset, not a DatasetDict")
        return Table(loaded.features, loaded, spec.path)
    if parquet_dir:
        return parquet_table(_parquet_split(path, spec, ctx), spec.path)
    return _hub_table(spec, ctx, str(path))  # a folder of csv/json/... files that datasets reads itself


def _hub_table(spec: SplitConfig, ctx: ReadContext, name: str) -> Table:
    split = spec.split or ctx.split_name
    try:
        import datasets  # imported only when used: 0.4 s

        ds = datasets.load_dataset(name, spec.subset, split=split)
    except Exception as exc:  # datasets raises many types (network, missing config or split, ...)
        raise ConfigError(f"{ctx.field_path}.path", f"cannot load dataset {name!r} (subset {spec.subset!r}, "
                                                    f"split {split!r}): {brief(exc)}; expected {_LOCAL_FORMS} "
                                                    f"(a Hub name loads offline only from the local cache)"
                          ) from None
    return Table(ds.features, ds, spec.path)


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


def parquet_table(files: list[Path], origin: str, all_features: bool = True) -> Table:
    """Parquet files read with pyarrow. Their features are the ``datasets`` features stored in the schema
    (``all_features``: or, without them, the plain types), else None."""
    import pyarrow.parquet as pq  # imported only when used: 0.06 s

    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            shown = origin if len(files) == 1 else str(f)
            raise DataError(shown, f"cannot read as parquet: {brief(exc, 200)}") from None
    features = None
    schema = tables[0].schema
    if all_features or (schema.metadata and b"huggingface" in schema.metadata):
        import datasets  # imported only when used: 0.4 s

        features = datasets.Features.from_arrow_schema(schema)
    return Table(features, (row for t in tables for row in t.to_pylist()), origin)


def _class_names(feature: Any) -> tuple[list[str], bool] | None:
    """``(names, is_list)`` of a ``ClassLabel`` feature or a list of them (``Sequence(ClassLabel)``)."""
    import datasets  # imported only when used: 0.4 s

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), False
    if isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(feature.feature, datasets.ClassLabel):
        return list(feature.feature.names), True
    return None


def table_records(table: Table, shown: str) -> Iterator[Record]:
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
                                       f"0..{len(names) - 1} ({short(', '.join(names))})", line)
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


def check_features(features: Any, columns: list[tuple[str, str, bool, bool]], origin: str, field_path: str,
                   check_columns: bool) -> None:
    """Config errors found from the features alone: a mapped column that is not there (``check_columns``),
    and tags that are integers without names.

    Args:
        features: the table's features.
        columns: ``(key, column, explicit, needed)`` of each config field read (``text``, ``split_by``, ...).
        origin: how the message names the table.
        field_path: config path of the split.
        check_columns: whether a missing column is an error here (else each row reports it).

    Raises:
        ConfigError: naming ``field_path.key``.
    """
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


def class_label_names(features: Any, columns: list[tuple[str, str, bool, bool]], target_map: dict | None,
                      map_key: str | None) -> dict[str, list[str]]:
    """Canonical field -> class names in the dataset's order, for fields read from ``ClassLabel`` columns.

    Args:
        features: the table's features.
        columns: ``(field, column, explicit, needed)`` of each field read.
        target_map: the split's ``target_map`` (None: none), applied to the names of ``map_key``'s column
            when it maps every one of them.
        map_key: the field ``target_map`` applies to.

    Returns:
        Field -> its class names, for the fields whose column is a ``ClassLabel`` (or a list of them).
    """
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


def brief(exc: Exception, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters (its type when it has none)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def short(value: Any) -> str:
    """``repr(value)``, cut to 80 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
