"""Markdown reference of every config field, generated from the dataclasses (docs/config.md embeds it)."""

from __future__ import annotations

import dataclasses
import typing

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
    TrainingConfig,
)
from multitune.registry import family


def _table(cls: type, title: str) -> str:
    hints = typing.get_type_hints(cls)
    rows = [f"### {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat") or f.metadata.get("internal"):  # not keys of their own
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
             _table(SplitConfig, "tasks.NAME.data.{train,validation,test}"),
             _table(SplitFractions, "tasks.NAME.data.split")]
    for name in tasks.names():
        cls = tasks.get(name).config_class
        parts.append(_table(cls, f"tasks.NAME with type: {name}"))
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


if __name__ == "__main__":
    print(reference())
