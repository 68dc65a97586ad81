"""Per-task model selection: each task's own best validation step, and the weights the task had then.

The run's model (``RUN/model``) is the checkpoint with the best *selection* metric (by default the mean over
tasks): a compromise, and a task often peaks at another step. At every validation evaluation
:class:`PerTaskBest` keeps, for each trained task, its best main score (higher is better,
:meth:`Task.selection_score`), the step and the metrics in the trainer state, so that a checkpoint holds them
and ``--resume`` continues exactly. With ``training.per_task_best`` it also keeps, when a task improves, a
snapshot of the weights the task had then, in ``RUN/checkpoints/best-per-task/<task>/``:

- ``snapshot.json``: task, step, score, the metrics at that step, the task's state then (label maps;
  decision thresholds stay as they were at that step, since ``tune_threshold`` calibrates the final model
  only), so that an export from the snapshot scores exactly the recorded metrics; and ``weights``, where the
  weights are (below).
- ``weights.safetensors`` (``"weights": "weights.safetensors"``): the parameters the task uses that can differ
  from the run's final model, named as in the model's state dict: its head; its adapter (the shared one when
  adapters are shared, and the task embeddings of ``shared_conditioned``); every backbone parameter the
  optimizer holds (full or partial fine-tuning, including layers that gradual unfreezing opens only later). A
  parameter that never trains (frozen layers, the backbone under adapters) is the same in ``RUN/model``,
  which supplies it: a snapshot is an overlay on the run's model directory, never a model of its own.
- or no weights file (``"weights": "best"``) while the task's best step is the step of the run's best
  checkpoint: ``RUN/checkpoints/best`` holds those weights already, so none are written. When the run's best
  checkpoint moves on to a later step and the task's best stays, the task's parameters are first copied out
  of the old best checkpoint into the snapshot's own ``weights.safetensors`` (the same bytes a snapshot
  written at that step has). Cost on disk: at most one copy of the trained parameters per task whose best
  step is not the run's (a backbone per task under full fine-tuning; the task's adapter and head with
  per-task adapters).

A snapshot is written into a temporary directory and renamed into place (:func:`multitune.fileio.replace_dir`)
before the evaluation's checkpoints, so a crash leaves either the old or the new snapshot, complete; a
snapshot that refers to the best checkpoint is only ever written at the step that checkpoint is written, and
is made self-contained before that checkpoint is replaced. On resume, a snapshot the checkpoint's state does
not record (written after it) is removed; the resumed run, which repeats the same steps, writes it again.

``multitune export RUN --task T`` (:mod:`multitune.export.task`) loads ``RUN/model`` and puts T's snapshot
over it with :func:`load_snapshot`.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from multitune.errors import MultituneError
from multitune.fileio import recover_dir, replace_dir, write_json_atomic
from multitune.tasks.base import Task
from multitune.training.callbacks import Callback
from multitune.training.checkpoint import MODEL_WEIGHTS, STATE_FILE, find_checkpoint

PER_TASK_DIR = "best-per-task"  # under RUN/checkpoints/
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "snapshot.json"
IN_BEST = "best"  # snapshot.json "weights": the weights are those of RUN/checkpoints/best (same step)
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
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in _task_named_parameters(model, task, trainable)}


def _task_named_parameters(model: nn.Module, task: str, trainable: set[int]) -> list[tuple[str, nn.Parameter]]:
    adapters = getattr(model, "adapters", None)
    return [(name, p) for name, p in model.named_parameters() if id(p) in trainable and _used_by(name, task, adapters)]


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

    def update(self, records: dict[str, dict], step: int, results: dict[str, dict[str, float]],
               best_moves: bool = False) -> list[str]:
        """Record (in the trainer state's per-task ``records``) the tasks whose main score beats their best so
        far (strictly; a non-finite score never counts), keep their snapshots and log them.

        Args:
            best_moves: the run's best checkpoint is written at this step (after this call): a task that
                improves now refers to it, and a snapshot that refers to the old one gets its own weights
                first.

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
        if self.main_process and self.snapshots and best_moves:
            self._before_best_moves(keep=improved)
        for name in improved:
            if self.main_process:
                if self.snapshots:
                    self._write(name, records[name], in_best=best_moves)
                self.log({"kind": "task_best", "step": step, "task": name, "score": records[name]["score"]})
        return improved

    def on_run_start(self, run: Any) -> None:
        self.start(run.state.per_task_best, run.resumed)

    def on_evaluate(self, run: Any, results: dict[str, dict[str, float]]) -> None:
        with run.timing_writes():
            self.update(run.state.per_task_best, run.state.step, results, best_moves=run.improved)

    def _before_best_moves(self, keep: list[str]) -> None:
        """Give every snapshot that refers to the best checkpoint (except those of the tasks in ``keep``, which
        are replaced now) its own weights, read from that checkpoint, before it is replaced."""
        if not self.directory.is_dir():
            return
        for snap in sorted(self.directory.iterdir()):
            meta = _read_meta(snap) if snap.is_dir() and not snap.name.startswith(".") else {}
            if meta.get("weights") != IN_BEST or meta.get("task") in keep or meta.get("task") != snap.name:
                continue
            best = _best_checkpoint(snap, meta)
            names = [n for n, _ in _task_named_parameters(self.model, snap.name, self.trainable)]
            self._publish(snap.name, {**meta, "weights": WEIGHTS_FILE},
                          _read_tensors(best / MODEL_WEIGHTS, names, self.model))

    def _write(self, name: str, record: dict, in_best: bool) -> None:
        params = _task_named_parameters(self.model, name, self.trainable)
        meta = {"format": FORMAT, "task": name, **record, "task_state": self.tasks[name].state(),
                "parameters": sum(p.numel() for _, p in params), "weights": IN_BEST if in_best else WEIGHTS_FILE}
        self._publish(name, meta, None if in_best else task_parameters(self.model, name, self.trainable))

    def _publish(self, name: str, meta: dict, tensors: dict[str, torch.Tensor] | None) -> None:
        """Write a snapshot into a new temporary directory and rename it into place."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale)
        tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        if tensors is not None:
            # one metadata key: safetensors writes several in no fixed order, and a resumed run must write the
            # same bytes
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        write_json_atomic(tmp / META_FILE, meta)
        replace_dir(tmp, self.directory / name)


def _read_meta(directory: Path) -> dict:
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _best_checkpoint(snapshot: Path, meta: dict) -> Path:
    """The run's best checkpoint that a snapshot with ``"weights": "best"`` refers to (``checkpoints/best``
    beside ``checkpoints/best-per-task``).

    Raises:
        MultituneError: there is none, or it is of another step than the snapshot.
    """
    where = Path(snapshot).parent.parent / "best"
    found = find_checkpoint(where)
    try:
        step = json.loads((found / STATE_FILE).read_text(encoding="utf-8")).get("step") if found else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        step = None
    if found is None or step != meta.get("step"):
        held = "does not exist" if found is None else f"holds step {step}"
        raise MultituneError(f"{Path(snapshot) / META_FILE}: the snapshot's weights are those of the run's best "
                             f"checkpoint at step {meta.get('step')}, but {where} {held}")
    return found


def _read_tensors(file: Path, names: Sequence[str], model: nn.Module) -> dict[str, torch.Tensor]:
    """``names`` (parameters of ``model``) read from a checkpoint's weights file. A name the file lacks
    because it shares its tensor with another one (tied weights, which safetensors stores once) is read under
    the name the file has.

    Raises:
        MultituneError: the file cannot be read or lacks one of them.
    """
    own = model.state_dict()
    try:
        with safe_open(str(file), framework="pt") as fh:
            keys = set(fh.keys())
            out = {}
            for name in names:
                stored = name if name in keys else next(
                    (k for k, v in own.items() if k in keys and v.data_ptr() == own[name].data_ptr()
                     and v.shape == own[name].shape), None)
                if stored is None:
                    raise MultituneError(f"{file}: has no weights {name!r}")
                out[name] = fh.get_tensor(stored).contiguous()
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise MultituneError(f"{file}: cannot read the checkpoint: {' '.join(str(exc).split())[:200]}") from None
    return out


def find_snapshot(checkpoints: Path, task: str) -> Path | None:
    """``task``'s snapshot directory under a run's ``checkpoints/`` (surviving a crash mid-rename), or None."""
    found = recover_dir(Path(checkpoints) / PER_TASK_DIR / task)
    return found if found is not None and (found / META_FILE).is_file() else None


def load_snapshot(directory: Path, model: nn.Module, task: str) -> dict:
    """Put ``task``'s snapshot over ``model`` (the run's final model): its weights (from the run's best
    checkpoint when the snapshot refers to it), and the task's state.

    Returns:
        The snapshot's ``snapshot.json`` (``step``, ``score``, ``metrics``, ...).

    Raises:
        MultituneError: one line naming the file when the snapshot is unreadable, does not fit ``model``, or
            refers to a best checkpoint that is missing or of another step.
    """
    meta_file = Path(directory) / META_FILE
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MultituneError(f"{meta_file}: cannot read the per-task snapshot: {' '.join(str(exc).split())}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("task") != task \
            or not isinstance(meta.get("step"), int) or meta.get("weights", WEIGHTS_FILE) not in (WEIGHTS_FILE, IN_BEST):
        raise MultituneError(f"{meta_file}: not a per-task snapshot of task {task!r}")
    in_best = meta.get("weights") == IN_BEST
    # the whole best checkpoint is the model at that step: the task's parameters and ones it leaves alone
    weights_file = _best_checkpoint(directory, meta) / MODEL_WEIGHTS if in_best else Path(directory) / WEIGHTS_FILE
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
