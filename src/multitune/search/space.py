"""The search space: config field paths and the values each may take, read from YAML and checked against
the run config before any trial runs.

```yaml
training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}   # a float range (log-uniform)
training.warmup_ratio: {low: 0.0, high: 0.2, step: 0.05}          # a float range on a grid
training.batch_size: [16, 32]                                      # a list: one of these values
sampling.temperature: [1, 2, 5]
tasks.ner.dropout: {low: 0.0, high: 0.3}
```

A range is integer when ``low`` and ``high`` are both integers (``type: float`` or ``low: 1.0`` makes it a
float range). Values reach the config through the same overrides as ``multitune train --set``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitune.config.loader import apply_overrides, parse_config, read_yaml
from multitune.errors import ConfigError, MultituneError

RANGE_KEYS = {"low", "high", "log", "step", "type"}


@dataclass
class Parameter:
    """One searched config field.

    Attributes:
        path: dotted config field path, e.g. ``training.learning_rate``.
        choices: the values of a list parameter (else None).
        low, high: bounds of a range parameter (inclusive).
        log: sample a range log-uniformly.
        step: grid spacing of a range (None: continuous).
        integer: an integer range.
    """

    path: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def grid(self) -> list:
        """The values a grid search visits: the list, or the range at its step.

        Raises:
            MultituneError: a range without a step (a grid needs finitely many values).
        """
        if self.choices is not None:
            return list(self.choices)
        if self.step is None and not self.integer:
            raise MultituneError(f"--strategy grid: {self.path} needs a list of values or a step")
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.integer else [round(v, 12) for v in values]

    def probes(self) -> list:
        """Values that check the field against the config: the ends and, for a float range, a value
        between them that is not an integer (so that an integer field refuses a float range)."""
        if self.choices is not None:
            return list(self.choices)
        if self.integer:
            return [self.low, self.high]
        mid = math.sqrt(self.low * self.high) if self.log else self.low + 0.37 * (self.high - self.low)
        return [self.low, self.high, mid + 1e-7 if float(mid).is_integer() else mid]

    def suggest(self, trial: Any) -> Any:
        """Draw this parameter's value from an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.path, self.choices)
        if self.integer:
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> dict:
        """The plain-data form (kept in the study, so that a resumed search can check it searches the same)."""
        if self.choices is not None:
            return {"choices": self.choices}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step,
                "type": "int" if self.integer else "float"}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(where, f"expected a number, got {value!r}")
    try:
        number = float(value)  # YAML reads 1e-5 (no dot) as a string
    except ValueError:
        raise ConfigError(where, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(where, f"expected a finite number, got {value!r}")
    return number


def parse_parameter(path: str, spec: Any) -> Parameter:
    """One parameter from its YAML value: a list of values or a ``{low, high[, log, step, type]}`` range.

    Raises:
        ConfigError: naming the field path: an empty list, a non-scalar value, a bad range.
    """
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(path, "an empty list of values")
        for v in spec:
            if not (v is None or isinstance(v, (str, int, float, bool))):
                raise ConfigError(path, f"list values must be plain numbers, strings or booleans, got {v!r}")
        return Parameter(path, choices=list(dict.fromkeys(spec)))
    if not isinstance(spec, dict):
        raise ConfigError(path, f"expected a list of values or {{low, high[, log, step, type]}}, got {spec!r}")
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}", f"unknown key; valid keys: {', '.join(sorted(RANGE_KEYS))}")
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"{path}.{key}", "required field is missing")
    low, high = _number(spec["low"], f"{path}.low"), _number(spec["high"], f"{path}.high")
    kind = spec.get("type")
    if kind not in (None, "int", "float"):
        raise ConfigError(f"{path}.type", f"got {kind!r}; expected one of: int, float")
    integer = kind == "int" or (kind is None and all(isinstance(spec[k], int) and not isinstance(spec[k], bool)
                                                      for k in ("low", "high")))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{path}.log", f"expected true or false, got {log!r}")
    step = None if spec.get("step") is None else _number(spec["step"], f"{path}.step")
    if not low < high:
        raise ConfigError(path, f"expected low < high, got low {spec['low']} and high {spec['high']}")
    if log and low <= 0:
        raise ConfigError(f"{path}.low", f"must be greater than 0 with log: true, got {spec['low']}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{path}.step", "must be greater than 0, and not with log: true")
    if integer and not (low.is_integer() and high.is_integer() and (step is None or step.is_integer())):
        raise ConfigError(path, "an integer range needs integer low, high and step")
    return Parameter(path, low=low, high=high, log=log, step=step, integer=integer)


@dataclass
class SearchSpace:
    """The searched parameters, in file order."""

    parameters: list[Parameter]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw every parameter from an Optuna trial: field path -> value."""
        return {p.path: p.suggest(trial) for p in self.parameters}

    def grid(self) -> dict[str, list]:
        """Field path -> values, for Optuna's grid sampler."""
        return {p.path: p.grid() for p in self.parameters}

    def describe(self) -> dict:
        return {p.path: p.describe() for p in self.parameters}


def overrides_for(values: dict[str, Any]) -> list[str]:
    """``--set`` overrides (``path=value``) that put sampled values into a config."""
    return [f"{path}={json.dumps(value)}" for path, value in values.items()]


def load_space(path: str | Path, base: dict[str, Any]) -> SearchSpace:
    """Read a search space and check every parameter against the run config ``base`` (plain data).

    Each parameter's probe values are put into ``base`` with the ``--set`` mechanism and the result is
    validated as a run config, so an unknown field, a value of the wrong type or one out of the field's
    range is reported before any trial trains.

    Raises:
        MultituneError: one line, ``SPACE_FILE: field.path: problem``.
    """
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        raise MultituneError(f"--space: {exc}") from None
    if not data:
        raise MultituneError(f"{path}: the search space names no config field")
    parameters = []
    for key, spec in data.items():
        try:
            param = parse_parameter(str(key), spec)
        except ConfigError as exc:
            raise MultituneError(f"{path}: {exc}") from None
        for value in param.probes():
            try:
                parse_config(apply_overrides(copy.deepcopy(base), overrides_for({param.path: value})),
                             check_files=False)
            except ConfigError as exc:  # another field's error names the value that caused it
                hint = "" if exc.path == param.path else f" (with {param.path} = {value!r})"
                raise MultituneError(f"{path}: {exc}{hint}") from None
        parameters.append(param)
    return SearchSpace(parameters)
