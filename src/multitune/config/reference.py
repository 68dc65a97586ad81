"""Markdown reference of every config field, generated from the dataclasses (docs/config.md embeds it)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection, Mapping
from typing import Any

from multitune.config.adapters import AdapterConfig
from multitune.config.parse import _describe
from multitune.config.schema import (
    AnalysisConfig,
    BackboneConfig,
    EarlyStoppingConfig,
    FreezeConfig,
    GradualUnfreezingConfig,
    RunConfig,
    SplitConfig,
    SplitFractions,
    StageConfig,
    TaskDataConfig,
    TrainingConfig,
)
from multitune.registry import family


def _table(cls: type, title: str, skip: Collection[str] = (), used_by: Mapping[str, list[str]] | None = None
           ) -> str:
    """The field table of config class ``cls``, without the fields in ``skip``; ``used_by`` adds, to the fields
    it names, the task types that use them."""
    hints = typing.get_type_hints(cls)
    rows = [f"### {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat") or f.metadata.get("internal") or f.name in skip:  # not keys of their own
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default) if f.default is not None else "null"
        elif f.default_factory is not dataclasses.MISSING:
            default = "see below"
        else:
            default = "**required**"
        meaning = f.metadata.get("help", "")
        if "choices" in f.metadata:
            meaning += f" ({' / '.join(map(str, f.metadata['choices']))})"
        if used_by and f.name in used_by:
            meaning += f" (task types: {', '.join(used_by[f.name])})"
        rows.append(f"| `{f.name}` | {_describe(hints[f.name])} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def reference() -> str:
    """The field tables of the run config, every task type, sampler, loss weighting and adapter method."""
    tasks, samplers, weightings, methods = (family(name) for name in ("tasks", "sampling", "weighting",
                                                                      "adapters"))
    parts = [_table(RunConfig, "top level"), _table(BackboneConfig, "backbone"), _table(TrainingConfig, "training"),
             _table(EarlyStoppingConfig, "training.early_stopping"),
             _table(GradualUnfreezingConfig, "training.gradual_unfreezing"),
             _table(FreezeConfig, "freeze"), _table(StageConfig, "stages[i]"), _table(AdapterConfig, "adapters"),
             _table(AnalysisConfig, "analysis"),
             _table(TaskDataConfig, "tasks.NAME.data"),
             _table(SplitConfig, "tasks.NAME.data.{train,validation,test}", used_by=_columns_used(tasks)),
             _table(SplitFractions, "tasks.NAME.data.split")]
    for name in tasks.names():
        cls = tasks.get(name).config_class
        skip = () if _has_label_set(tasks.get(name), name) else ("labels",)
        parts.append(_table(cls, f"tasks.NAME with type: {name}", skip))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # a task's own nested sections, e.g. text2text's generation
            if dataclasses.is_dataclass(hints[f.name]) and f.name != "data":
                parts.append(_table(hints[f.name], f"tasks.NAME.{f.name} with type: {name}"))
    for name in samplers.names():
        parts.append(_table(samplers.get(name).config_class, f"sampling with strategy: {name}"))
    for name in weightings.names():
        parts.append(_table(weightings.get(name).config_class, f"loss_weighting with strategy: {name}"))
    for name in methods.names():
        parts.append(_table(methods.get(name).config_class, f"adapters with method: {name}"))
    return "\n".join(parts)


def _columns_used(tasks: Any) -> dict[str, list[str]]:
    """Example field (``text``, ``label``, ``tokens``, ...) -> the task types that read it (their ``fields``),
    for the data section's column settings of the same names."""
    used: dict[str, list[str]] = {}
    for name in tasks.names():
        for key in tasks.get(name).fields:
            used.setdefault(key, []).append(name)
    return used


def _has_label_set(task_class: Any, name: str) -> bool:
    """Whether task type ``name`` uses the ``labels`` field: its task object has a label set (``task.labels``,
    which a run's label order and the export read). Built from the config's defaults, which is cheap: task
    constructors do no work."""
    try:
        task = task_class(name, task_class.config_class(type=name))
    except TypeError:  # a config with required fields of its own: keep the field listed
        return True
    return hasattr(task, "labels")


if __name__ == "__main__":
    print(reference())
