"""Gradient affinity during training: how the tasks of a run pull on the parameters they share.

Every ``analysis.affinity_every`` optimizer steps, :class:`AffinityProbe` takes one batch of every trained task
and measures, on the *shared* trainable parameters only (the backbone's, or the adapters several tasks use;
never a task head, see :func:`multitune.training.multistep.shared_parameters`):

- the **gradient cosine similarity** ``cos(g_i, g_j)`` of the tasks' loss gradients ``g_i``;
- the **look-ahead task affinity** of Fifty et al. (2021), "Efficiently Identifying Task Groupings for
  Multi-Task Learning" (TAG): for each task ``i``, a look-ahead SGD step ``θ' = θ - lr · g_i`` of the shared
  parameters, then for each task ``j``, ``Z[i][j] = 1 - L_j(θ', batch_j) / L_j(θ, batch_j)``. Positive: a step
  on ``i`` lowers ``j``'s loss (``i`` helps ``j``); negative: it raises it. ``lr`` is the optimizer's current
  learning rate of each shared parameter (the rate of the next step; where it is 0, at the end of a linear decay,
  the parameter group's peak rate) or ``analysis.lookahead_lr``.

The measurement never changes training: the batches are a seeded draw from the training features that depends
on the step alone (not the training batch streams, and the same after ``--resume``); the gradients come from
``torch.autograd.grad`` (no ``.grad`` is touched); the shared parameters are copied back exactly after each
look-ahead; the optimizer, the scheduler and the loss weighting are not touched; every random number generator
is saved and restored. The model is measured in eval mode (no dropout: the ratios compare two deterministic
forward passes, so their difference is the look-ahead step's effect and not dropout noise), in fp32 even when
the run trains in bf16 (the look-ahead changes a loss by far less than bf16's rounding), and each module's
train/eval mode is restored afterwards.

Memory: one flat fp32 gradient per task plus one copy of the shared parameters. Time: per measurement one
forward and backward pass per task and ``tasks²`` forward passes. With several processes every process measures
the same batches on its own unwrapped model (identical parameters, so identical numbers, and no collective
operation that could leave a process waiting); the main process logs.

Each measurement is one ``metrics.jsonl`` record::

    {"kind": "affinity", "step": N, "cosine": {i: {j: v}}, "tag": {i: {j: v}}, "seconds": s}

(``null`` where a value is undefined: a zero gradient, a zero or non-finite loss). At the end of the run
:func:`write_transfer` puts the mean matrices into ``results.json`` (``transfer``) and draws ``affinity.png``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from multitune.errors import ConfigError
from multitune.fileio import read_jsonl
from multitune.training.callbacks import Callback
from multitune.training.multistep import shared_parameters

Matrix = dict[str, dict[str, "float | None"]]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def cosine_matrix(grads: Mapping[str, torch.Tensor]) -> Matrix:
    """Cosine similarity of every pair of flat gradients: symmetric, 1 on the diagonal; ``None`` where a
    gradient is zero (or not finite)."""
    names = list(grads)
    norms = {n: float(torch.linalg.vector_norm(grads[n])) for n in names}
    out: Matrix = {n: {} for n in names}
    for a, i in enumerate(names):
        for j in names[a:]:
            if not (norms[i] > 0 and norms[j] > 0 and math.isfinite(norms[i]) and math.isfinite(norms[j])):
                value = None
            elif i == j:
                value = 1.0
            else:
                value = _finite(max(-1.0, min(1.0, float(torch.dot(grads[i], grads[j])) / (norms[i] * norms[j]))))
            out[i][j] = out[j][i] = value
    return out


def lookahead_ratio(before: float, after: float) -> float | None:
    """TAG's ``1 - L(θ') / L(θ)``; ``None`` when it is undefined (a loss that is zero, negative or not finite)."""
    if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
        return None
    return 1.0 - after / before


def task_affinity(loss_of: Callable[[str], torch.Tensor], tasks: Sequence[str], params: Sequence[nn.Parameter],
                  rates: float | Sequence[float]) -> tuple[Matrix, Matrix]:
    """Gradient cosine similarity and look-ahead task affinity of ``tasks`` over ``params``.

    Args:
        loss_of: the loss of a task on its (fixed) batch at the current parameters; called with gradients
            enabled once per task, then ``len(tasks)²`` times under ``torch.no_grad``.
        tasks: task names, in order.
        params: the shared parameters (all requiring gradients); they are left exactly as they were.
        rates: the look-ahead learning rate, one for all or one per parameter.

    Returns:
        ``(cosine, tag)``, each ``{i: {j: value}}``; ``tag[i][j] = 1 - L_j(θ - lr·g_i) / L_j(θ)``.
    """
    params = list(params)
    rates = [float(rates)] * len(params) if isinstance(rates, (int, float)) else [float(r) for r in rates]
    before: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}
    for name in tasks:
        loss = loss_of(name)
        before[name] = float(loss.detach())
        reached = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
        grads[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                                 for g, p in zip(reached, params)]) if params else torch.zeros(0)
        del loss, reached
    cosine = cosine_matrix(grads)
    originals = [p.detach().clone() for p in params]
    tag: Matrix = {}
    try:
        with torch.no_grad():
            for i in tasks:
                offset = 0
                for p, rate in zip(params, rates):
                    n = p.numel()
                    p.sub_((rate * grads[i][offset:offset + n]).view_as(p).to(p.dtype))
                    offset += n
                tag[i] = {j: lookahead_ratio(before[j], float(loss_of(j))) for j in tasks}
                for p, original in zip(params, originals):
                    p.copy_(original)
    finally:  # also when a forward pass fails: the run goes on from exactly the parameters it had
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
    return cosine, tag


class _PreservedState:
    """Every random number generator and each module's train/eval mode, restored on exit; the model is in eval
    mode inside."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.python, self.numpy = random.getstate(), np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for module, mode in self.modes:
            module.training = mode
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class AffinityProbe(Callback):
    """Measures gradient cosine similarity and look-ahead task affinity every ``analysis.affinity_every`` steps
    (see the module docstring). A probe that is off (``affinity_every: 0``, or fewer than two trained tasks)
    does nothing.

    Args:
        config: the run config (``analysis``, ``seed``, ``training``).
        multi: the run's :class:`~multitune.training.multistep.WeightedStep` (its unwrapped model and trained
            parameters; the shared ones are found as for gradient-level loss weighting).
        prepared: task name -> prepared task (task and tokenised features) of the run.
        active: the tasks the run trains, in run order.
        pad_id: the tokenizer's padding id.
        staged: the run is one stage of a sequential or AdapterFusion run: a stage with nothing shared is then
            not measured instead of refused.

    Raises:
        ConfigError: the analysis is on and the run trains no shared parameters (per-task adapters on a frozen
            backbone, or a frozen backbone without adapters), or ``affinity_every`` exceeds ``max_steps``.
    """

    SEED_OFFSET = 104_729  # keeps the probe's draws apart from the run's other seeded streams

    def __init__(self, config: Any, multi: Any, prepared: Mapping[str, Any], active: Sequence[str], pad_id: int,
                 staged: bool = False):
        self.every = config.analysis.affinity_every
        self.core = multi.core
        self.tasks = [n for n in active if len(prepared[n].features.get("train", [])) > 0]
        if self.every and len(self.tasks) < 2:  # nothing to relate (e.g. a single-task stage)
            self.every = 0
        self.shared: list[nn.Parameter] = []
        if not self.every:
            return
        if not staged and self.every > config.training.max_steps:
            raise ConfigError("analysis.affinity_every", f"({self.every}) must not exceed training.max_steps "
                                                         f"({config.training.max_steps}): nothing would be measured")
        self.shared = shared_parameters(self.core, multi.trained)
        if not self.shared:
            if staged:
                self.every = 0
                return
            raise ConfigError("analysis.affinity_every", "gradient affinity is measured on the parameters that the "
                                                         "tasks share, and this run trains none (per-task adapters "
                                                         "or a frozen backbone); use adapters.arrangement shared or "
                                                         "train the backbone")
        self.prepared = {n: prepared[n] for n in self.tasks}
        self.batch_size = config.analysis.batch_size or config.training.batch_size
        self.lookahead_lr = config.analysis.lookahead_lr
        self.seed = (config.seed + self.SEED_OFFSET) % 2**32
        self.pad_id = pad_id
        self.device = next(self.core.parameters()).device

    def batch(self, name: str, step: int) -> dict[str, torch.Tensor]:
        """The task's batch for the measurement at ``step``: a seeded draw (without replacement) from its training
        features, a function of (seed, task, step) alone."""
        index = self.tasks.index(name)
        features = self.prepared[name].features["train"]
        rng = np.random.default_rng([self.seed, index, step])
        rows = rng.choice(len(features), size=min(self.batch_size, len(features)), replace=False)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))  # e.g. masked-LM masking
        batch = self.prepared[name].task.collate([features[i] for i in rows], self.pad_id, generator)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _rates(self, live: Sequence[nn.Parameter], optimizer: Any) -> list[float]:
        if self.lookahead_lr is not None:
            return [self.lookahead_lr] * len(live)
        rate: dict[int, float] = {}
        for group in optimizer.param_groups:
            lr = group["lr"] or group.get("initial_lr", group["lr"])  # 0 at the end of a linear decay: the peak
            rate.update((id(p), lr) for p in group["params"])
        return [rate.get(id(p), 0.0) for p in live]

    def measure(self, step: int, optimizer: Any, autocast: Callable[[], Any]) -> dict | None:
        """One measurement at the model's current parameters; ``None`` when no shared parameter trains yet
        (gradual unfreezing)."""
        live = [p for p in self.shared if p.requires_grad]
        if not live:
            return None
        start = time.perf_counter()
        with _PreservedState(self.core):
            batches = {n: self.batch(n, step) for n in self.tasks}

            # fp32 whatever the run's precision: a look-ahead step changes a loss by 1e-6 to 1e-3 of itself,
            # below bf16's rounding (~4e-3), so TAG under bf16 autocast measured rounding noise
            def loss_of(name: str) -> torch.Tensor:
                return self.core(name, batches[name]).loss.float()

            cosine, tag = task_affinity(loss_of, self.tasks, live, self._rates(live, optimizer))
        return {"kind": "affinity", "step": step, "cosine": cosine, "tag": tag,
                "seconds": round(time.perf_counter() - start, 4)}

    def after_step(self, step: int, optimizer: Any, autocast: Callable[[], Any], log: Callable[[dict], None]) -> float:
        """Measure and log when ``step`` (the optimizer step just taken, counted from 1) is a multiple of
        ``affinity_every``.

        Returns:
            The seconds spent (0 when nothing was measured), so that the caller can leave them out of the
            training time.
        """
        if not self.every or step % self.every:
            return 0.0
        start = time.perf_counter()
        record = self.measure(step, optimizer, autocast)
        if record is not None:
            log(record)
        return time.perf_counter() - start

    def on_step_end(self, run: Any) -> None:
        self.after_step(run.state.step, run.optimizer, run.autocast, run.log)

    def on_run_end(self, run: Any, results: dict) -> None:
        if run.main_process:
            write_transfer(run.out, results)


def batches_drawn(batcher: Any) -> int:
    """How many batches a :class:`~multitune.training.batching.TaskBatcher` has handed out (from its resumable
    ``(epoch, position)`` state: exact after ``--resume``)."""
    per_epoch = math.ceil(len(batcher._order) / batcher.batch_size) if len(batcher._order) else 0
    return batcher.epoch * per_epoch + math.ceil(batcher.position / batcher.batch_size)


def mean_matrix(matrices: Sequence[Matrix]) -> Matrix:
    """Cell-wise mean over the matrices that define the cell (``None`` where none does)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for m in matrices:
        for i, row in m.items():
            for j, v in row.items():
                rows.setdefault(i, {}).setdefault(j, [])
                if v is not None:
                    rows[i][j].append(float(v))
    return {i: {j: (sum(vs) / len(vs) if vs else None) for j, vs in row.items()} for i, row in rows.items()}


def transfer_summary(records: Sequence[dict]) -> dict | None:
    """``results.json``'s ``transfer``: the mean cosine and TAG matrices over a run's ``affinity`` records, the
    number of measurements and the seconds they took (``None`` when there are none)."""
    samples = [r for r in records if r.get("kind") == "affinity"]
    if not samples:
        return None
    return {"tasks": list(samples[0]["cosine"]), "samples": len(samples), "steps": [r["step"] for r in samples],
            "cosine": mean_matrix([r["cosine"] for r in samples]), "tag": mean_matrix([r["tag"] for r in samples]),
            "seconds": round(sum(r.get("seconds", 0.0) for r in samples), 3)}


def write_transfer(out: Path, results: dict) -> None:
    """At the end of a run: ``results["transfer"]`` from the run's ``metrics.jsonl`` and ``affinity.png``
    (nothing when the run measured nothing)."""
    path = Path(out) / "metrics.jsonl"
    summary = transfer_summary(read_jsonl(path)) if path.is_file() else None
    if summary is None:
        return
    results["transfer"] = summary
    try:
        plot_affinity(summary["cosine"], summary["tag"], Path(out) / "affinity.png",
                      f"mean of {summary['samples']} measurement{'s' if summary['samples'] != 1 else ''}")
    except ImportError:  # matplotlib is a dependency, but a broken install must not lose a finished run
        pass


def plot_affinity(cosine: Matrix, tag: Matrix, path: Path, subtitle: str = "") -> Path:
    """Heatmaps of the cosine and TAG matrices side by side (rows: the task of the gradient / look-ahead step;
    columns: the task it is compared with / whose loss changes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(cosine)
    n = len(tasks)

    def grid(m: Matrix) -> np.ndarray:
        return np.array([[np.nan if m.get(i, {}).get(j) is None else m[i][j] for j in tasks] for i in tasks],
                        dtype=float)

    cos, z = grid(cosine), grid(tag)
    # the colour scale of TAG follows the cross-task values (a task's affinity with itself is usually far larger
    # and would wash them out; the diagonal then shows saturated)
    cross = np.abs(z[np.isfinite(z) & ~np.eye(n, dtype=bool)])
    every = np.abs(z[np.isfinite(z)])
    zmax = next((float(v.max()) for v in (cross, every) if v.size and v.max() > 0), 1.0)
    size = 1.0 + 0.9 * n
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 2.6, size + 0.9))
    panels = ((axes[0], cos, 1.0, "gradient cosine similarity", "{:.2f}", "gradient of task", "compared with task"),
              (axes[1], z, zmax, "look-ahead affinity (TAG)", "{:.2g}", "look-ahead step on task", "loss of task"))
    for ax, values, vmax, title, fmt, ylabel, xlabel in panels:
        image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu", vmin=-vmax, vmax=vmax)
        ax.set_xticks(range(n), tasks, rotation=30, ha="right")
        ax.set_yticks(range(n), tasks)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        for a in range(n):
            for b in range(n):
                value = values[a, b]
                text = "n/a" if not np.isfinite(value) else fmt.format(value)
                dark = np.isfinite(value) and abs(value) > 0.6 * vmax
                ax.text(b, a, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if subtitle:
        fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
