"""Crash-safe checkpoints: model, optimizer, scheduler, loss weighting, samplers and RNG states.

A checkpoint is written into a temporary directory and renamed into place; the previous good
checkpoint is only removed once the new one is complete.

``checkpoints/last`` holds everything a resume needs; ``checkpoints/best`` holds only what restoring the best
model needs (weights, loss weighting, trainer state), since nothing resumes from it. When both are written at
the same step, ``last`` links the files it shares with ``best`` (:func:`multitune.fileio.link_or_copy`)
instead of writing them again.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from multitune.errors import MultituneError
from multitune.fileio import link_or_copy, recover_dir, replace_dir, write_text_atomic
from multitune.training.distributed import load_weights

STATE_FILE = "trainer_state.json"
MODEL_WEIGHTS = "model.safetensors"
WEIGHTING_FILE = "weighting.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, model: nn.Module, weighting: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, state: dict, same_as: Path | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write a complete checkpoint at ``path`` (atomically replacing an older one).

    Args:
        optimizer, scheduler: None for a checkpoint of the weights only (``best``: nothing resumes from it).
        same_as: a checkpoint just written from the same model at the same moment (``best``, when ``last``
            follows it at the same step): its weight and state files are linked instead of written again,
            if its trainer state is exactly ``state``.

    Raises:
        MultituneError: the disk or quota filled up; the temporary directory is removed and the message names
            the file and the last good checkpoint.
    """
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # half-written by a process that was killed
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Python's JSON (NaN kept): a resumed run must see exactly the counters it saved
    state_text = json.dumps(state, indent=2, ensure_ascii=False) + "\n"
    try:
        # every file is new in tmp: a linked file is never written into (see multitune.fileio)
        weighted = bool(weighting.state_dict())  # learned weights and the state in buffers (e.g. loss histories)
        shared = [MODEL_WEIGHTS, STATE_FILE] + ([WEIGHTING_FILE] if weighted else [])
        if same_as is not None and _state_text(same_as) == state_text \
                and all((same_as / name).is_file() for name in shared):
            for name in shared:
                link_or_copy(same_as / name, tmp / name)
        else:
            if weights is None:
                save_model(model, str(tmp / MODEL_WEIGHTS))
            else:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / MODEL_WEIGHTS))
            if weighted:
                save_model(weighting, str(tmp / WEIGHTING_FILE))
            write_text_atomic(tmp / STATE_FILE, state_text)
        if optimizer is not None:
            _torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": rng_states()}, tmp / OPTIMIZER_FILE)
        replace_dir(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            last = find_checkpoint(path)
            raise MultituneError(f"{_failed_file(exc, tmp)}: {_reason(exc)} while writing checkpoint "
                                 f"{path.name}; "
                                 + (f"the last good checkpoint is {last} (free space, then resume with --resume)"
                                    if last is not None else "no checkpoint of this run was written yet")) from None
        raise


def _state_text(path: Path) -> str | None:
    try:
        return (path / STATE_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class _Recorder(io.RawIOBase):
    """A file that keeps the OSError of a failed write: torch.save reports it only as an opaque RuntimeError."""

    def __init__(self, fh: Any):
        self.fh, self.error = fh, None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        recorder = _Recorder(fh)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                recorder.error.filename = recorder.error.filename or str(path)
                raise recorder.error from None
            raise


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk, the quota or the file-size limit was reached (also when safetensors or
    torch wrapped the OSError in their own exception)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "File too large"))


def _reason(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    return strerror.lower() if isinstance(strerror, str) else "the disk is full (or a quota or file-size limit " \
                                                             "was reached)"


def _failed_file(exc: BaseException, tmp: Path) -> str:
    return str(getattr(exc, "filename", None) or tmp)


def _alive(pid: str) -> bool:
    """Whether the process that named a temporary directory still runs (its files are not ours to delete)."""
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # our own leftover
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint directory to resume from (surviving a crash mid-rename), or None."""
    found = recover_dir(path)
    return found if found is not None and (found / STATE_FILE).is_file() else None


def load_checkpoint(path: Path, model: nn.Module, weighting: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    restore_rng: bool = False) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects; returns the trainer state.

    Only safetensors and ``weights_only`` torch files are read: a checkpoint cannot run code.
    """
    try:
        load_weights(model, path / MODEL_WEIGHTS)  # (an FSDP-sharded model: every process takes its shard)
        if weighting is not None and (path / WEIGHTING_FILE).exists():
            load_model(weighting, str(path / WEIGHTING_FILE), strict=True)
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if optimizer is not None:
            try:
                extra = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
            except pickle.UnpicklingError:
                raise MultituneError(f"{path / OPTIMIZER_FILE}: cannot load checkpoint: it holds pickled objects "
                                     "other than tensors and plain data, which weights_only loading refuses "
                                     "(a checkpoint must not run code)") from None
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            if restore_rng:
                set_rng_states(extra["rng"])
    except (OSError, RuntimeError, ValueError, json.JSONDecodeError, KeyError, SafetensorError) as exc:
        raise MultituneError(f"{path}: cannot load checkpoint: {' '.join(str(exc).split())[:300]}") from None
    return state
