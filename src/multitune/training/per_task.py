"""Per-task model selection: each task's own best validation step, and the weights the task had then.

The run's model (``RUN/model``) is the checkpoint with the best *selection* metric (by default the mean over
tasks): a compromise, and a task often peaks at another step. At every validation evaluation
:class:`PerTaskBest` keeps, for each trained task, its best main score (higher is better,
:meth:`Task.selection_score`), the step and the metrics in the trainer state, so that a checkpoint holds them
and ``--resume`` continues exactly. With ``training.per_task_best`` it also writes, when a task improves, a
snapshot of the weights the task had then, in ``RUN/checkpoints/best-per-task/<task>/``:

- ``weights.safetensors``: the parameters the task uses that can differ from the run's final model, named as
  in the model's state dict: its head; its adapter (the shared one when adapters are shared, and the task
  embeddings of ``shared_conditioned``); every backbone parameter the optimizer holds (full or partial
  fine-tuning, including layers that gradual unfreezing opens only later). A parameter that never trains
  (frozen layers, the backbone under adapters) is the same in ``RUN/model``, which supplies it: a snapshot
  is an overlay on the run's model directory, never a model of its own. Cost on disk: one copy of the
  trained parameters per task (a backbone per task under full fine-tuning; the task's adapter and head with
  per-task adapters).
- ``snapshot.json``: task, step, score, the metrics at that step, and the task's state then (label maps;
  decision thresholds stay as they were at that step, since ``tune_threshold`` calibrates the final model
  only), so that an export from the snapshot scores exactly the recorded metrics.

A snapshot is written into a temporary directory and renamed into place (:func:`multitune.fileio.replace_dir`)
before the evaluation's checkpoint, so a crash leaves either the old or the new snapshot, complete. On resume,
a snapshot the checkpoint's state does not record (written after it) is removed; the resumed run, which
repeats the same steps, writes it again.

``multitune export RUN --task T`` (:mod:`multitune.adapters.export`) loads ``RUN/model`` and puts T's
snapshot over it with :func:`load_snapshot`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from multitune.errors import MultituneError
from multitune.fileio import recover_dir, replace_dir, write_json_atomic
from multitune.tasks.base import Task
from multitune.training.callbacks import Callback

PER_TASK_DIR = "best-per-task"  # under RUN/checkpoints/
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "snapshot.json"
FORMAT = "multitune-task-snapshot"
STATE_KEY = "per_task_best"  # in the trainer state and in results.json["train"]


def task_parameters(model: nn.Module, task: str, trainable: set[int]) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that ``task`` uses and that training can change, by state-dict name.

    Args:
        model: the (unwrapped) :class:`multitune.model.MultiTaskModel`.
        task: the task name.
        trainable: ``id()`` of every parameter the optimizer holds.

    Returns:
        Name -> a CPU copy of the tensor (other tasks' heads and per-task adapters left out).
    """
    adapters = getattr(model, "adapters", None)
    out = {}
    for name, p in model.named_parameters():
        if id(p) in trainable and _used_by(name, task, adapters):
            out[name] = p.detach().to("cpu", copy=True).contiguous()
    return out


def _used_by(name: str, task: str, adapters: Any) -> bool:
    parts = name.split(".")
    if parts[0] == "heads":
        return parts[1] == task
    if parts[0] == "adapters" and adapters is not None and len(parts) > 2:
        if parts[1] == "adapters":  # one adapter per name: the task's own, or the shared one
            return parts[2] == adapters.assignment[task]
        if parts[1] == "fusion":
            return parts[2] == task
    return True  # the backbone, task embeddings


class PerTaskBest(Callback):
    """Tracks each task's best validation step and writes its snapshot (see the module docstring).

    Args:
        directory: ``RUN/checkpoints/best-per-task``.
        model: the unwrapped multi-task model being trained.
        trainable: every parameter the optimizer holds (those that can differ from their initial value).
        tasks: task name -> task (for :meth:`Task.selection_score` and :meth:`Task.state`).
        active: the tasks trained in this run (or stage); only they are tracked.
        snapshots: write snapshots (``training.per_task_best``); the records are kept either way.
        main_process: only the main process writes.
        log: the run log (gets a ``task_best`` record per improvement).
    """

    def __init__(self, directory: Path, model: nn.Module, trainable: Iterable[nn.Parameter], tasks: dict[str, Task],
                 active: Sequence[str], snapshots: bool, main_process: bool, log: Callable[[dict], None]):
        self.directory = Path(directory)
        self.model = model
        self.trainable = {id(p) for p in trainable}
        self.tasks = tasks
        self.active = list(active)
        self.snapshots = snapshots
        self.main_process = main_process
        self.log = log

    def start(self, records: dict[str, dict], resuming: bool) -> None:
        """Make the snapshot directory agree with the trainer state's per-task records (after a resume has
        loaded them): a fresh run removes old snapshots; a resumed one keeps those the records name."""
        if not (self.snapshots and self.main_process) or not self.directory.exists():
            return
        if not resuming:
            shutil.rmtree(self.directory)
            return
        for stale in self.directory.glob(".*.tmp-*"):  # half-written by a process that was killed
            shutil.rmtree(stale)
        for old in self.directory.glob("*.old"):  # a crash inside replace_dir
            final = old.with_name(old.name[: -len(".old")])
            if final.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, final)
        for snap in self.directory.iterdir():  # a snapshot written after the checkpoint: the run writes it again
            record = records.get(snap.name)
            if not snap.is_dir():
                snap.unlink()
            elif record is None or _read_meta(snap).get("step") != record["step"]:
                shutil.rmtree(snap)

    def update(self, records: dict[str, dict], step: int, results: dict[str, dict[str, float]]) -> list[str]:
        """Record (in the trainer state's per-task ``records``) the tasks whose main score beats their best so
        far (strictly; a non-finite score never counts), write their snapshots and log them.

        Returns:
            The names of the tasks that improved.
        """
        improved = []
        for name in self.active:
            if name not in results:
                continue
            score = float(self.tasks[name].selection_score(results[name]))
            if not math.isfinite(score) or (name in records and not score > records[name]["score"]):
                continue
            records[name] = {"step": step, "score": score, "metrics": dict(results[name])}
            improved.append(name)
            if self.main_process:
                if self.snapshots:
                    self._write(name, records[name])
                self.log({"kind": "task_best", "step": step, "task": name, "score": score})
        return improved

    def on_run_start(self, run: Any) -> None:
        self.start(run.state.per_task_best, run.resumed)

    def on_evaluate(self, run: Any, results: dict[str, dict[str, float]]) -> None:
        self.update(run.state.per_task_best, run.state.step, results)

    def _write(self, name: str, record: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale)
        tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        tensors = task_parameters(self.model, name, self.trainable)
        # one metadata key: safetensors writes several in no fixed order, and a resumed run must write the same bytes
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        write_json_atomic(tmp / META_FILE, {"format": FORMAT, "task": name, **record,
                                            "task_state": self.tasks[name].state(),
                                            "parameters": sum(t.numel() for t in tensors.values())})
        replace_dir(tmp, self.directory / name)


def _read_meta(directory: Path) -> dict:
    try:
        return json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def find_snapshot(checkpoints: Path, task: str) -> Path | None:
    """``task``'s snapshot directory under a run's ``checkpoints/`` (surviving a crash mid-rename), or None."""
    found = recover_dir(Path(checkpoints) / PER_TASK_DIR / task)
    return found if found is not None and (found / META_FILE).is_file() else None


def load_snapshot(directory: Path, model: nn.Module, task: str) -> dict:
    """Put ``task``'s snapshot over ``model`` (the run's final model): its weights, and the task's state.

    Returns:
        The snapshot's ``snapshot.json`` (``step``, ``score``, ``metrics``, ...).

    Raises:
        MultituneError: one line naming the file when the snapshot is unreadable or does not fit ``model``.
    """
    meta_file, weights_file = Path(directory) / META_FILE, Path(directory) / WEIGHTS_FILE
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MultituneError(f"{meta_file}: cannot read the per-task snapshot: {' '.join(str(exc).split())}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("task") != task \
            or not isinstance(meta.get("step"), int):
        raise MultituneError(f"{meta_file}: not a per-task snapshot of task {task!r}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise MultituneError(f"{weights_file}: cannot load the snapshot: {' '.join(str(exc).split())[:200]}") from None
    own = model.state_dict()
    for key, value in tensors.items():
        if key not in own or own[key].shape != value.shape:
            what = "is not in the model" if key not in own else \
                f"has shape {list(value.shape)}, the model's {list(own[key].shape)}"
            raise MultituneError(f"{weights_file}: the snapshot does not match the model: {key} {what}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    if "task_state" in meta:
        model.tasks[task].load_state(meta["task_state"])
    return meta
