"""Turn plain YAML data into typed config dataclasses, with errors that name the field path.

Each config dataclass field carries ``metadata``: ``help`` (shown in docs), and optionally
``choices`` (allowed values), ``min`` / ``max`` (inclusive bounds) and ``gt`` (strict lower bound).
A dataclass may define ``validate(self, path)`` for checks that involve several fields.

Two markers serve sections whose keys are partly typed later by a registry (the ``adapters`` section: the
method's own keys sit flat beside the shared ones): a ``flat`` field receives, as a plain mapping, every
key that is not one of the other fields (instead of an unknown-key error), and an ``internal`` field is
never read from the data. Such a dataclass defines ``to_data()`` for its plain-data form.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from multitune.errors import ConfigError, shown

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _describe(tp: Any) -> str:
    if tp is Any:  # only fields that hold Python objects, such as an in-memory dataset
        return "a Python object"
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    origin = get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted.

    Raises:
        ConfigError: naming ``path`` and the expected type.
    """
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"expected {_describe(tp)}, got nothing")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path)
            except ConfigError as exc:
                errors.append((arg, exc))
        # a mapping given for a dataclass member reports that member's error (a bad key, or its validate())
        if isinstance(value, dict):
            for arg, exc in errors:
                if dataclasses.is_dataclass(arg) or exc.path != path:
                    raise exc
        raise ConfigError(path, f"expected {_describe(tp)}, got {shown(value)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise _choice_error(path, value, get_args(tp))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {shown(value)}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {shown(value)}")
        return [convert(v, item_tp, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {shown(value)}")
        return {convert(k, key_tp, path) if key_tp is not Any else k: convert(v, val_tp, _join(path, str(k)))
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"expected an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:  # YAML reads 5e-5 (no dot) as a string
                    value = float(value)
                except ValueError:
                    raise ConfigError(path, f"expected a number, got {shown(value)}") from None
            else:
                raise ConfigError(path, f"expected a number, got {shown(value)}")
        if not math.isfinite(float(value)):
            raise ConfigError(path, f"expected a finite number, got {shown(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(path, f"expected a string, got {shown(value)}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _choice_error(path: str, value: Any, choices: typing.Iterable[Any]) -> ConfigError:
    choices = list(choices)
    # only a string gets a did-you-mean: str() of anything else may be huge (a YAML alias bomb)
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(path, f"got {shown(value)}{hint}; expected one of: {', '.join(str(c) for c in choices)}")


def check_field(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    """Apply a field's ``choices`` / ``min`` / ``max`` / ``gt`` metadata."""
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise _choice_error(path, value, meta["choices"])
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(path, f"must be greater than {meta['gt']}, got {shown(value)}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(path, f"must be at least {meta['min']}, got {shown(value)}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(path, f"must be at most {meta['max']}, got {shown(value)}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys, types and field metadata.

    Raises:
        ConfigError: for an unknown key (with a did-you-mean), a missing required field,
            a wrong type or a value outside the field's allowed values.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)
              if f.init and not f.metadata.get("internal") and not f.metadata.get("flat")}
    flat = next((f.name for f in dataclasses.fields(cls) if f.metadata.get("flat")), None)
    extra = {k: v for k, v in data.items() if k not in fields}
    if extra and flat is None:
        key = next(iter(extra))
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(_join(path, str(key)), f"unknown key{hint}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        fpath = _join(path, name)
        if name in data:
            value = convert(data[name], hints[name], fpath)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(fpath, f"required field is missing ({f.metadata.get('help', 'no default')})")
        else:
            continue
        check_field(value, f.metadata, fpath)
        kwargs[name] = value
    if flat is not None and extra:
        kwargs[flat] = extra
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (what ``config.yaml`` in a run directory holds).

    An in-memory ``datasets.Dataset`` (a split given through the Python API) becomes the record of what it
    was, ``{type, fingerprint, rows, columns}``: enough to tell whether a resumed run has the same data.
    """
    if dataclasses.is_dataclass(obj) and callable(getattr(obj, "to_data", None)):
        return to_dict(obj.to_data())
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if datasets_kind(obj) == "Dataset":
        return {"type": "datasets.Dataset", "fingerprint": obj._fingerprint, "rows": obj.num_rows,
                "columns": list(obj.column_names)}
    return obj


def datasets_kind(obj: Any) -> str | None:
    """The class name of a ``datasets`` object (``Dataset``, ``DatasetDict``, ``IterableDataset``,
    ``IterableDatasetDict``), or None for anything else. Never imports ``datasets`` itself: an object of it
    can only exist once the library is loaded.
    """
    module = sys.modules.get("datasets")
    if module is None:
        return None
    for name in ("Dataset", "DatasetDict", "IterableDataset", "IterableDatasetDict"):
        cls = getattr(module, name, None)
        if cls is not None and isinstance(obj, cls):
            return name
    return None


def field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, **checks: Any) -> Any:
    """A config field with its help text and checks (``choices``, ``min``, ``max``, ``gt``)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
