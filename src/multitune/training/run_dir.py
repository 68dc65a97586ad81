"""The run directory a training run writes: who may write it, and whether a resume matches it.

``--resume`` continues the run with the config it was saved with; only the fields in :data:`RESUMABLE` may
differ. ``training.max_steps`` may change to extend a finished or interrupted run (or shorten an interrupted
one), never below the steps the run has made; the learning-rate schedule then follows
:func:`multitune.training.setup.continue_schedule`. A run in stages may change nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from multitune.config.parse import to_dict
from multitune.config.safe_yaml import read_yaml
from multitune.config.schema import RunConfig
from multitune.data.fingerprint import data_files
from multitune.errors import ConfigError, MultituneError
from multitune.rundir import check_output_dir, created_by_multitune, lock_dir, write_marker
from multitune.training.checkpoint import STATE_FILE, find_checkpoint

CHECKPOINTS = "checkpoints"

#: config fields that may differ from the saved config on ``--resume`` (of a run without stages)
RESUMABLE = ("training.max_steps",)


def check_run_dir(config: RunConfig, out: Path, resume: bool, overwrite: bool,
                      protect: tuple[Path, ...] = ()) -> bool:
    """Return True when the run resumes from a checkpoint. Reads only (see :mod:`multitune.rundir`): refuses
    to mix two runs in one directory, to resume or clear a directory multitune did not write, and to clear one
    that holds the run's inputs. A directory that holds a run is locked for this process from here on.

    Raises:
        MultituneError: on ``--resume``, the config differs from the saved one in a field not in
            :data:`RESUMABLE` (the message lists those that may change), or ``training.max_steps`` is below
            the steps the run's checkpoint has made.
    """
    owned = check_output_dir(out, overwrite=overwrite, resume=resume,
                             protected=(*protect, *data_files(config)))
    if owned and main_process():  # before anything is read or prepared: no other process may be writing it
        lock_dir(out)
        write_marker(out, "run")
    if not resume:
        return False
    saved = out / "config.yaml"
    if saved.exists():
        try:  # the bounded reader: a damaged or hostile saved config is one line too
            previous = read_yaml(saved)
        except ConfigError as exc:
            raise MultituneError(f"cannot read the run's saved config: {exc}; the run cannot be resumed") from None
        current = to_dict(config)
        if previous != current:
            diff = differences(previous, current) if isinstance(previous, dict) else ["(not a mapping)"]
            may_change = () if config.runs_in_stages else RESUMABLE
            refused = [d for d in diff if d not in may_change]
            if refused:
                allowed = (f"on --resume only {' and '.join(may_change)} may change (to extend the run)"
                           if may_change else "a run in stages resumes with the config it was saved with")
                raise MultituneError(f"{out}: --resume with a different config (differs in: {', '.join(refused)});"
                                     f" {allowed}")
    step = checkpoint_step(out)
    max_steps = config.training.max_steps
    if step is not None and max_steps < step:
        raise MultituneError(f"training.max_steps: {max_steps} is below the {step} steps the run in {out} has "
                             f"made; on --resume max_steps may grow to extend the run, not shrink below them")
    return find_checkpoint(out / CHECKPOINTS / "last") is not None


def checkpoint_step(out: Path) -> int | None:
    """The step of the run's last checkpoint (None without one, or when its trainer state is unreadable:
    restoring it then names the problem)."""
    found = find_checkpoint(out / CHECKPOINTS / "last")
    try:
        step = json.loads((found / STATE_FILE).read_text(encoding="utf-8"))["step"] if found else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def finished_results(config: RunConfig, out: Path) -> dict | None:
    """The ``results.json`` of the finished run in ``out`` when ``--resume`` with ``config`` has nothing left to
    train, else None (the full checks then run). Reads only.

    Finished: its results were made at the step of its last checkpoint (an extension that was interrupted
    has a later checkpoint). Nothing left: the config is the saved one, or differs only in a
    ``training.max_steps`` equal to the steps made. A run in stages is never judged here (its stages are).
    """
    if config.runs_in_stages or not out.is_dir() or not created_by_multitune(out.resolve()):
        return None
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        previous = read_yaml(out / "config.yaml")
    except (OSError, ValueError, ConfigError):
        return None
    steps = results.get("train", {}).get("steps") if isinstance(results, dict) and isinstance(
        results.get("train"), dict) else None
    step = checkpoint_step(out)
    if step is None or steps != step:
        return None
    diff = differences(previous, to_dict(config))
    return results if not diff or diff == ["training.max_steps"] and config.training.max_steps == step else None


def main_process() -> bool:
    """Whether this is the process that writes the run (rank 0 of an ``accelerate launch``; read from the
    environment because the run directory is checked before Accelerate starts)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths of the fields in which two plain-data configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    return [] if old == new else [path]
