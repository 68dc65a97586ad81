"""The run directory a training run writes: who may write it, and whether a resume matches it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from multitune.config.parse import to_dict
from multitune.config.safe_yaml import read_yaml
from multitune.config.schema import RunConfig
from multitune.data.fingerprint import data_files
from multitune.errors import ConfigError, MultituneError
from multitune.rundir import check_output_dir, lock_dir, write_marker
from multitune.training.checkpoint import find_checkpoint

CHECKPOINTS = "checkpoints"


def check_run_dir(config: RunConfig, out: Path, resume: bool, overwrite: bool,
                      protect: tuple[Path, ...] = ()) -> bool:
    """Return True when the run resumes from a checkpoint. Reads only (see :mod:`multitune.rundir`): refuses
    to mix two runs in one directory, to resume or clear a directory multitune did not write, and to clear one
    that holds the run's inputs. A directory that holds a run is locked for this process from here on."""
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
            raise MultituneError(f"{out}: --resume with a different config (differs in: {', '.join(diff)})")
    return find_checkpoint(out / CHECKPOINTS / "last") is not None


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
