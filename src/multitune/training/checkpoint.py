"""Crash-safe checkpoints: model, optimizer, scheduler, loss weighting, samplers and RNG states.

A checkpoint is written into a temporary directory and renamed into place; the previous good
checkpoint is only removed once the new one is complete.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from multitune.errors import MultituneError
from multitune.fileio import recover_dir, replace_dir, write_json_atomic

STATE_FILE = "trainer_state.json"


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, model: nn.Module, weighting: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict) -> None:
    """Write a complete checkpoint at ``path`` (atomically replacing an older one)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # half-written by a process that was killed
        shutil.rmtree(stale)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    if weighting.state_dict():  # learned weights and the state in buffers (e.g. loss histories)
        save_model(weighting, str(tmp / "weighting.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()},
               tmp / "optimizer.pt")
    write_json_atomic(tmp / STATE_FILE, state)
    replace_dir(tmp, path)


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
        load_model(model, str(path / "model.safetensors"), strict=True)
        if weighting is not None and (path / "weighting.safetensors").exists():
            load_model(weighting, str(path / "weighting.safetensors"), strict=True)
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if optimizer is not None:
            try:
                extra = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            except pickle.UnpicklingError:
                raise MultituneError(f"{path / 'optimizer.pt'}: cannot load checkpoint: it holds pickled objects "
                                     "other than tensors and plain data, which weights_only loading refuses "
                                     "(a checkpoint must not run code)") from None
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            if restore_rng:
                set_rng_states(extra["rng"])
    except (OSError, RuntimeError, ValueError, json.JSONDecodeError, KeyError, SafetensorError) as exc:
        raise MultituneError(f"{path}: cannot load checkpoint: {' '.join(str(exc).split())[:300]}") from None
    return state
