"""The files of a multitune model directory: their names, and the checks and loading of ``multitune.json``
and of the heads' and adapters' weights, before anything is built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from multitune.backbones.architectures import ARCHITECTURES
from multitune.backbones.pooling import POOLERS
from multitune.config.parse import from_dict
from multitune.errors import ConfigError, MultituneError, shown
from multitune.tasks.base import TASKS, Task

MODEL_FILE = "multitune.json"
HEADS_FILE = "heads.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
#: the backbone's own directory inside a model directory (format 2): config, weights, tokenizer
BACKBONE_DIR = "backbone"
# 1: the backbone at the top of the model directory; 2: in BACKBONE_DIR, so that no stock task class can load
# the multi-task directory with a newly initialised head (there is no config.json at its top)
FORMAT_VERSION = 2


def restore_tasks(meta: dict, file: Path) -> dict[str, Task]:
    """The tasks of a ``multitune.json`` (``meta``), each built from its config and given its saved state.

    Raises:
        MultituneError: a malformed task entry, an unknown task type, a config that does not parse or a state
            the task cannot restore, naming ``file`` and the field.
    """
    if not isinstance(meta, dict):
        raise MultituneError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    _check_tasks(meta.get("tasks", _MISSING), file)
    tasks = {}
    for name, entry in meta["tasks"].items():
        impl = TASKS.get(entry["config"]["type"], f"{file}: tasks.{name}.config.type")
        try:
            config = from_dict(impl.config_class, entry["config"], f"tasks.{name}.config")
        except ConfigError as exc:
            raise MultituneError(f"{file}: {exc}") from None
        task = impl(name, config)
        try:
            task.load_state(entry["state"])
        except KeyError as exc:
            raise MultituneError(f"{file}: tasks.{name}.state.{exc.args[0]}: required by a {config.type} task, "
                                 f"missing") from None
        except (TypeError, ValueError) as exc:
            raise MultituneError(f"{file}: tasks.{name}.state: cannot restore the task: "
                                 f"{' '.join(str(exc).split())[:200]}") from None
        tasks[name] = task
    return tasks


# -- the shape of multitune.json, checked before anything is built from it -------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(check: Any) -> Any:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _or_null(check: Any) -> Any:
    return lambda v: v is None or check(v)


#: top-level fields: name -> (expected, check, required); other keys (backbone_source, trained_steps, export
#: details...) are informational and left to their readers
_META_FIELDS = {
    "format_version": (f"an integer from 1 to {FORMAT_VERSION}",
                       lambda v: _is_int(v) and 1 <= v <= FORMAT_VERSION, False),
    "backbone_type": ("one of " + ", ".join(ARCHITECTURES.names()), lambda v: v in ARCHITECTURES.names(), False),
    "pooling": ("one of mean, cls, max, last", lambda v: isinstance(v, str) and v in POOLERS, True),
    "normalize_embeddings": ("true or false", lambda v: isinstance(v, bool), True),
    "max_length": ("a positive integer", lambda v: _is_int(v) and v > 0, True),
    "tasks": ("a mapping of task name -> {config, state}", lambda v: isinstance(v, dict), True),
    "adapters": ("a mapping with the adapter config and its sites", lambda v: isinstance(v, dict), False),
    "export": ("a mapping", lambda v: isinstance(v, dict), False),
}
#: what the task types keep in their state (``Task.state``): key -> (expected, check)
_STATE_FIELDS = {
    "labels": ("a list of strings", _list_of(lambda x: isinstance(x, str))),
    "class_weights": ("a list of numbers or null", _or_null(_list_of(_is_number))),
    "thresholds": ("a list of numbers or null", _or_null(_list_of(_is_number))),
    "pair_input": ("true or false", lambda v: isinstance(v, bool)),
    "head": ("a string or null", _or_null(lambda v: isinstance(v, str))),
    "lowercase": ("true or false", lambda v: isinstance(v, bool)),
    "mask_token_id": ("an integer", _is_int),
    "vocab_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "special_ids": ("a list of integers", _list_of(_is_int)),
}
_MISSING = object()


def _expected(file: Path, field: str, expected: str, value: Any) -> MultituneError:
    got = "nothing (the key is missing)" if value is _MISSING else shown(value)
    return MultituneError(f"{file}: {field}: expected {expected}, got {got}")


def check_metadata(meta: Any, file: Path) -> None:
    """Check the shape of a ``multitune.json`` (``meta``, read from ``file``): a missing key or a value of the
    wrong type (a hand-edited or truncated file) is one line naming the field, e.g.
    ``model/multitune.json: tasks.sentiment.state.labels: expected a list of strings, got 'neg'``.

    Raises:
        MultituneError: naming ``file``, the field and what was expected.
    """
    if not isinstance(meta, dict):
        raise MultituneError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    for key, (expected, check, required) in _META_FIELDS.items():
        value = meta.get(key, _MISSING)
        if (value is _MISSING and required) or (value is not _MISSING and not check(value)):
            raise _expected(file, key, expected, value)
    _check_tasks(meta["tasks"], file)
    adapters = meta.get("adapters")
    if adapters and not _list_of(lambda x: isinstance(x, str))(adapters.get("sites", _MISSING)):
        raise _expected(file, "adapters.sites", "a list of module names", adapters.get("sites", _MISSING))


def _check_tasks(tasks: Any, file: Path) -> None:
    if not isinstance(tasks, dict):
        raise _expected(file, "tasks", _META_FIELDS["tasks"][0], tasks)
    for name, entry in tasks.items():
        where = f"tasks.{name}"
        if not isinstance(entry, dict):
            raise _expected(file, where, "a mapping with config and state", entry)
        for part in ("config", "state"):
            if not isinstance(entry.get(part, _MISSING), dict):
                raise _expected(file, f"{where}.{part}", "a mapping", entry.get(part, _MISSING))
        kind = entry["config"].get("type", _MISSING)
        if not isinstance(kind, str):
            raise _expected(file, f"{where}.config.type", "a task type (a string)", kind)
        for key, value in entry["state"].items():
            if key in _STATE_FIELDS and not _STATE_FIELDS[key][1](value):
                raise _expected(file, f"{where}.state.{key}", _STATE_FIELDS[key][0], value)


def load_weights(module: nn.Module, file: Path) -> None:
    """Load a safetensors file into ``module`` (all keys, exact shapes).

    Raises:
        MultituneError: the file is torn or does not fit the module.
    """
    try:
        module.load_state_dict(load_file(str(file)), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise MultituneError(f"{file}: cannot load the weights: {' '.join(str(exc).split())[:200]}") from None
