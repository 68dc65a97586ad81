"""Predict every task of a model at once: each input through every requested head, with one backbone pass
per batch for all head tasks (see :mod:`multitune.mixed`); text-to-text tasks generate.

Inputs are plain texts or text pairs. A task trained on pairs (``Task.pair_input``) takes pairs only, every
other task single texts only; asked for explicitly with the wrong form, a task is an :class:`InputError`.
Without an explicit task list each input goes to every task that takes its form.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from multitune.errors import InputError, MultituneError
from multitune.tasks.base import PAIR, TEXT, form_mismatch, input_parts


class UnknownTaskError(MultituneError):
    """A requested task is not one of the model's tasks.

    Attributes:
        task: the unknown name.
        valid: the model's task names.
    """

    def __init__(self, task: str, valid: Sequence[str]):
        self.task = task
        self.valid = list(valid)
        super().__init__(f"the model has no task {task!r}; its tasks: {', '.join(self.valid)}")


class NonFiniteError(MultituneError):
    """A prediction holds a score that is not a finite number (NaN or infinity), which JSON cannot carry.

    Attributes:
        where: the input it belongs to, e.g. ``inputs[3]``.
        field: the path of the first such number inside the prediction, e.g. ``scores.positive``.
    """

    def __init__(self, where: str, field: str, value: float):
        self.where = where
        self.field = field
        super().__init__(f"{where}: the prediction's {field} is {value} (not a finite number); the model computes "
                         f"NaN or infinity for this input (are its weights finite?), so no output was written")


def non_finite_fields(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON-able value (dicts, lists, numbers) that is NaN or infinite, as
    ``(path, value)`` with paths such as ``scores.positive`` or ``entities[2].score``."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return [] if math.isfinite(value) else [(path or "value", float(value))]
    found: list[tuple[str, float]] = []
    if isinstance(value, Mapping):
        for key, sub in value.items():
            found += non_finite_fields(sub, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, sub in enumerate(value):
            found += non_finite_fields(sub, f"{path}[{i}]")
    return found


def check_finite(prediction: Any, where: str) -> None:
    """Raise :class:`NonFiniteError` when ``prediction`` holds a NaN or infinite number.

    Args:
        prediction: one input's prediction (as :meth:`MultiTaskModel.predict` gives it).
        where: the input, for the message (``inputs[3]``, ``texts.jsonl:7``).
    """
    bad = non_finite_fields(prediction)
    if bad:
        raise NonFiniteError(where, *bad[0])


def input_form(task: Any) -> str:
    """``pair`` for a task that reads text pairs, else ``text``."""
    return PAIR if task.pair_input else TEXT


def normalize_input(item: Any, index: int) -> tuple[str, str | None]:
    """``(text, text_pair)`` from a string, a 2-sequence or a mapping with ``text`` (and ``text_pair``).

    Raises:
        InputError: naming ``inputs[index]``: another type, or an empty text.
    """
    return input_parts(item, f"inputs[{index}]")


def resolve_tasks(model: Any, inputs: Sequence[tuple[str, str | None]], tasks: Sequence[str] | None = None
                  ) -> list[list[str]]:
    """The tasks each (normalised) input goes to.

    Args:
        model: a :class:`~multitune.model.MultiTaskModel`.
        inputs: ``(text, text_pair)`` per input (see :func:`normalize_input`).
        tasks: task names (duplicates are dropped), or None: every task that takes the input's form.

    Returns:
        One list of task names per input, in the model's task order when ``tasks`` is None.

    Raises:
        UnknownTaskError: a name that is not one of the model's tasks.
        InputError: an explicit task does not take an input's form, or no task takes it.
    """
    if tasks is not None:
        names = list(dict.fromkeys(tasks))
        if not names:
            raise InputError("tasks: give at least one task, or leave tasks out for every task")
        for name in names:
            if name not in model.tasks:
                raise UnknownTaskError(name, list(model.tasks))
    plan = []
    for i, (_, pair) in enumerate(inputs):
        form = PAIR if pair is not None else TEXT
        if tasks is None:
            chosen = [n for n, t in model.tasks.items() if input_form(t) == form]
            if not chosen:
                raise InputError(f"inputs[{i}]: no task of this model takes a {'text pair' if pair else 'single text'}"
                                 f" (its tasks: {_forms(model)})")
        else:
            for name in names:
                problem = form_mismatch(name, model.tasks[name].pair_input, form == PAIR)
                if problem:
                    raise InputError(f"inputs[{i}]: {problem}")
            chosen = names
        plan.append(chosen)
    return plan


def _forms(model: Any) -> str:
    return ", ".join(f"{n} ({input_form(t)})" for n, t in model.tasks.items())


def predict_planned(model: Any, inputs: Sequence[tuple[str, str | None]], plan: Sequence[Sequence[str]],
                    batch_size: int = 32) -> list[dict[str, Any]]:
    """Predictions for inputs already checked by :func:`resolve_tasks`.

    Inputs are sorted by length and cut into batches of ``batch_size`` inputs (less padding); each batch is
    one mixed-task pass (:func:`multitune.mixed.predict_mixed`), whatever the number of tasks.

    Returns:
        Per input, ``{task: prediction}`` as :meth:`MultiTaskModel.predict` gives it, in input order.
    """

    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]) + len(inputs[i][1] or ""))
    out: list[dict[str, Any]] = [{} for _ in inputs]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        requests, owners = [], []
        for i in chunk:
            text, pair = inputs[i]
            for name in plan[i]:
                requests.append((name, text if pair is None else (text, pair)))
                owners.append((i, name))
        for (i, name), pred in zip(owners, model.predict_mixed(requests)):
            out[i][name] = pred
    return out


def predict_all(model: Any, inputs: Sequence[Any], tasks: Sequence[str] | None = None, batch_size: int = 32
                ) -> list[dict[str, Any]]:
    """Predict several tasks for each input with one backbone pass per batch.

    Args:
        model: a :class:`~multitune.model.MultiTaskModel`.
        inputs: strings, ``(text, text_pair)`` pairs or ``{"text": ..., "text_pair": ...}`` mappings.
        tasks: the tasks to predict (default: every task that takes the input's form, see the module doc).
        batch_size: inputs per backbone pass.

    Returns:
        Per input, ``{task: prediction}``; each prediction equals ``model.predict(task, [input])[0]``
        (up to float rounding of the padded batch).

    Raises:
        UnknownTaskError: a task the model does not have.
        InputError: a malformed input, or one that does not fit a requested task.

    Example:
        >>> predict_all(model, ["Anna loved Oslo"], ["sentiment", "ner"])
        [{"sentiment": {"label": "positive", ...}, "ner": {"entities": [...], ...}}]
    """
    normalised = [normalize_input(x, i) for i, x in enumerate(inputs)]
    return predict_planned(model, normalised, resolve_tasks(model, normalised, tasks), batch_size)
