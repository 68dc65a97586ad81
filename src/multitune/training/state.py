"""The counters of a training run: what a checkpoint records besides tensors, so that a resumed run continues
exactly where the interrupted one stood."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: keys of the snapshots taken of the run's other stateful parts (see :meth:`TrainerState.state_dict`)
SNAPSHOT_KEYS = ("sampler", "running", "batchers")


@dataclass
class TrainerState:
    """Where a run stands.

    Attributes:
        step: optimizer steps made.
        best_value, best_step: the best selection value so far and its step (None before the first evaluation).
        bad_evals: evaluations in a row without improvement (early stopping).
        examples, real_tokens, padded_tokens: training rows and tokens seen (padding included in the last).
        train_seconds: time spent training (evaluation and checkpoints excluded).
        bad_steps: steps skipped for a non-finite loss or gradient, per task; bad_in_a_row: the current streak.
        per_task_best: each task's own best step, score and metrics (see :mod:`multitune.training.per_task`).
        data_files: fingerprints of the data files the run reads (``--resume`` compares them).
        max_steps, warmup_steps: the learning-rate schedule the state was trained on (its total and its warmup,
            fixed when the run started): ``--resume`` with another ``training.max_steps`` rebuilds the schedule
            from them (see :func:`multitune.training.setup.continue_schedule`). None in older checkpoints.
    """

    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    examples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    train_seconds: float = 0.0
    bad_steps: dict[str, int] = field(default_factory=dict)
    bad_in_a_row: int = 0
    per_task_best: dict[str, dict] = field(default_factory=dict)
    data_files: dict[str, dict] | None = None
    max_steps: int | None = None
    warmup_steps: int | None = None

    def state_dict(self, **snapshots: Any) -> dict:
        """Plain data for ``trainer_state.json``: the counters, plus ``snapshots`` of the run's other stateful
        parts (sampler, running losses, batchers) taken at the same moment."""
        return {"step": self.step, "best_value": self.best_value, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "examples": self.examples, "real_tokens": self.real_tokens,
                "padded_tokens": self.padded_tokens, "train_seconds": self.train_seconds,
                "bad_steps": self.bad_steps, "bad_in_a_row": self.bad_in_a_row, "per_task_best": self.per_task_best,
                "data_files": self.data_files, "max_steps": self.max_steps, "warmup_steps": self.warmup_steps,
                **snapshots}

    @classmethod
    def from_state_dict(cls, data: dict) -> tuple[TrainerState, dict]:
        """The state a checkpoint recorded, and its snapshots (``SNAPSHOT_KEYS``). Checkpoints written before
        the numerical guard, per-task selection, data fingerprints or the recorded schedule existed load with those
        fields empty.

        Raises:
            KeyError, TypeError, ValueError: the data is not a trainer state (the caller names the file).
        """
        snapshots = {k: data[k] for k in SNAPSHOT_KEYS}
        state = cls(step=int(data["step"]), best_value=data.get("best_value"), best_step=data.get("best_step"),
                    bad_evals=int(data.get("bad_evals", 0)), examples=int(data.get("examples", 0)),
                    real_tokens=int(data.get("real_tokens", 0)), padded_tokens=int(data.get("padded_tokens", 0)),
                    train_seconds=float(data.get("train_seconds", 0.0)),
                    bad_steps=dict(data.get("bad_steps") or {}),
                    bad_in_a_row=int(data.get("bad_in_a_row", 0)),
                    per_task_best=dict(data.get("per_task_best") or {}), data_files=data.get("data_files"),
                    max_steps=_int_or_none(data.get("max_steps")), warmup_steps=_int_or_none(data.get("warmup_steps")))
        return state, snapshots


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
