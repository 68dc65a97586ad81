"""The :class:`Run`: what the loop and the callbacks of one training run work on.

It holds the built objects (accelerator, model, tasks, loss weighting, optimizer, scheduler, batchers, sampler,
log) and the :class:`~multitune.training.state.TrainerState`, and offers the few operations the loop is written
in (draw and forward a part of a step, backward, finish the gradients, step the optimizer, evaluate). A test
can drive :func:`multitune.training.loop.train_loop` with a fake object that has the same methods.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from multitune.evaluation.evaluator import evaluate_task
from multitune.model import MultiTaskModel
from multitune.tasks import Task
from multitune.tasks.prepared import PreparedTask
from multitune.training.callbacks import Callbacks
from multitune.training.distributed import all_processes, average_gradients, clip_gradients, shard_batch
from multitune.training.run_dir import CHECKPOINTS
from multitune.training.state import TrainerState


@dataclass
class StagePlan:
    """What one stage of a staged run trains (a single run has none; see :mod:`multitune.training.plan`).

    Attributes:
        active: tasks trained in the stage.
        seen: tasks evaluated (this and earlier stages).
        replay: share of batches from ``seen`` tasks that are not ``active``.
        init_from: model directory of the previous stage (backbone and every head start from it).
        before_write: called once the stage has passed every check, before it writes anything (the
            staged run prepares its own directory then, so a run that fails validation writes nothing).
        step_offset: optimizer steps of the stages before this one (callbacks count steps over the stages).
    """

    active: list[str]
    seen: list[str]
    replay: float = 0.0
    init_from: Path | None = None
    before_write: Any = None
    step_offset: int = 0


@dataclass(eq=False)
class Run:
    """One training run, built by :func:`multitune.training.trainer.build_run`.

    Attributes (the ones callbacks use most): ``config``, ``state``, ``tasks`` (name -> task), ``active``
    (trained tasks), ``evaluated``, ``core`` (the unwrapped model), ``optimizer``, ``scheduler``,
    ``weighting``, ``log`` (appends to ``metrics.jsonl``), ``console``, ``main_process``, ``out`` (the run
    directory), ``should_stop``.
    """

    config: Any
    out: Path
    console: Console
    accelerator: Any
    autocast: Any
    core: MultiTaskModel
    tasks: dict[str, Task]
    prepared: dict[str, PreparedTask]
    active: list[str]
    evaluated: list[str]
    weighting: Any
    multi: Any
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    batchers: dict[str, Any]
    sampler: Any
    strategy: Any
    pad_id: int
    deployed_attention: str | None
    log: Any = None
    bar: Any = None
    state: TrainerState = field(default_factory=TrainerState)
    callbacks: Callbacks = field(default_factory=Callbacks)
    selection_metric: str = "mean"
    step_offset: int = 0
    staged: bool = False  # one stage of a staged or AdapterFusion run
    resumed: bool = False
    max_steps_before: int | None = None  # resumed with another training.max_steps: the checkpoint's (else None)
    running: dict[str, list[float]] = field(default_factory=dict)  # train losses since the last log line
    step_losses: dict[str, float] = field(default_factory=dict)
    step_seconds: float = 0.0
    selection_value: float | None = None
    improved: bool = False
    #: the latest validation evaluation during training: (step, metrics, predictions), reused at the end of a run
    #: whose last step is its best (:func:`multitune.training.finish.finish_run`)
    last_validation: tuple[int, dict, dict] | None = None
    should_stop: bool = False
    stopped_early: bool = False
    write_seconds: float = 0.0  # spent writing checkpoints, per-task snapshots and the model (this process)

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    def checkpoint_dir(self, name: str) -> Path:
        return self.out / CHECKPOINTS / name

    @contextlib.contextmanager
    def timing_writes(self) -> Iterator[None]:
        """Count the time of the block in ``write_seconds`` (``results.json``: ``train.write_s``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.write_seconds += time.perf_counter() - start

    def snapshot(self) -> dict:
        """The trainer state with the sampler, running losses and batchers, as a checkpoint records it."""
        return self.state.state_dict(sampler=self.sampler.state_dict(), running=self.running,
                                     batchers={n: b.state_dict() for n, b in self.batchers.items()})

    # the operations the loop is written in

    def parts(self) -> list[list[str]]:
        """The tasks of one micro-step, in backward passes (see :class:`~multitune.training.multistep.WeightedStep`)."""
        return self.multi.parts()

    def forward(self, part: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """Draw one batch of each task of ``part``, count its rows and tokens, and compute the weighted loss
        (with one backbone pass for the tasks of the part that can share one, see
        :meth:`~multitune.training.multistep.WeightedStep.losses`).

        Returns:
            ``(combined loss, per-task loss values)``.
        """
        batches: dict[str, dict] = {}
        acc = self.accelerator
        for name in part:
            batch = self.batchers[name].next_batch()
            # a packed batch (training.packing) holds several examples per row
            self.state.examples += int(batch.get("packed_examples", len(batch["input_ids"])))
            self.state.real_tokens += int(batch["attention_mask"].sum())
            self.state.padded_tokens += batch["attention_mask"].numel()
            shard = shard_batch(batch, acc.process_index, acc.num_processes)
            batches[name] = {k: v.to(acc.device) for k, v in shard.items()}
        with self.autocast():
            losses = self.multi.losses(batches)  # through the DDP model, or the plain one
        self.multi.keep(batches)
        combined, _ = self.multi.weigh(losses)  # the weights are logged from the weighting itself
        return combined, {n: float(loss.detach()) for n, loss in losses.items()}

    def all_processes(self, flag: bool) -> bool:
        """``flag`` and-ed over the processes (they skip a step together)."""
        return all_processes(flag, self.accelerator)

    def begin_step(self) -> None:
        self.multi.begin()

    def backward(self, loss: torch.Tensor, values: dict[str, float]) -> None:
        self.multi.backward(loss, values)

    def finish_gradients(self, max_norm: float | None) -> float:
        """Average across processes, combine per-task gradients (gradient-level weighting) and clip.

        Returns:
            The total gradient norm (clipping computes it anyway; ``max_norm`` None or 0 scales nothing).
        """
        average_gradients(self.weighting, self.accelerator)  # learned loss weights live outside DDP
        self.multi.combine()
        return float(clip_gradients(self.accelerator, self.trainable, max_norm or math.inf))

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.multi.after_step(self.autocast)  # the loss weighting updates its state (e.g. loss histories)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, split: str, predictions: dict[str, list] | None = None) -> dict[str, dict[str, float]]:
        """Metrics of every evaluated task that has ``split``, in fp32 and with the attention kernels a loaded
        model gets, so that they are the metrics of the model a user loads.

        Args:
            predictions: filled with each task's predictions when given.
        """
        trained = getattr(self.core.backbone.config, "_attn_implementation", None)
        switch = self.deployed_attention is not None and trained != self.deployed_attention
        if switch:
            self.core.backbone.set_attn_implementation(self.deployed_attention)
        tcfg = self.config.training
        results = {}
        try:
            for n, p in self.prepared.items():
                if split in p.features and n in self.evaluated:
                    # in fp32 whatever training.precision says: the metrics are those of the model a user loads
                    results[n], preds = evaluate_task(self.core, p.task, p.features[split], p.data.splits[split],
                                                      tcfg.eval_batch_size or 2 * tcfg.batch_size, self.pad_id,
                                                      tcfg.eval_batch_tokens)
                    if predictions is not None:
                        predictions[n] = preds
        finally:
            if switch:
                self.core.backbone.set_attn_implementation(trained)
        return results
