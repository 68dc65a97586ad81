"""One optimizer step as the loss weighting declares it needs (see :mod:`multitune.weighting.base`).

The training loop asks :class:`WeightedStep` which tasks a step holds and hands it each loss to
back-propagate; what differs between strategies is decided here from their declared needs, never from
their names:

- one task drawn by the sampler per micro-step, or (``needs_all_tasks``) one batch of every task the
  sampler can draw, in the run's task order;
- one backward pass for all of them, or (``needs_per_task_gradients``) one per task: after each, the
  gradient of the *shared* trainable parameters (reached by several tasks: the backbone, shared adapters)
  is moved into that task's flat fp32 vector and cleared, while task-specific parameters (heads, per-task
  adapters) keep accumulating their own task's gradient. Before clipping, the strategy combines the
  vectors and the result becomes the shared parameters' gradient. Only the shared parameters are
  flattened: memory grows by (tasks + 1) x their size, not by the whole model's;
- after the optimizer step, :meth:`LossWeighting.step` gets the step's mean loss per task and
  (``needs_losses_after_step``) the same batches' losses after the update.

A part of several tasks (one backward pass for all: GradNorm, FAMO, and FAMO's losses after the update)
runs the backbone once over all its tasks' inputs, concatenated along the batch and padded to the longest
(:meth:`WeightedStep.losses`, :meth:`~multitune.model.MultiTaskModel.shared_encoding`); each task's head,
pooling and loss then run on its own rows. Padding every task to the longest one costs compute, so the part
shares a pass only when that adds at most :data:`MAX_EXTRA_PADDING` padded tokens to those of the tasks' own
batches (on the seed mixture, SST-2 sentences beside STS-B pairs and WNUT-17 tweets, it adds 58%, and a
shared pass made a GradNorm step 1.4x slower on CPU; with equal widths it made it 1.2x faster: see
bench/shared_pass.py). Tasks that do not declare their encoder inputs (text-to-text, masked LM), tasks whose
backbone computation differs (per-task adapters, task embeddings, AdapterFusion) and forward passes through a
DDP module keep a forward pass each.

Strategies with per-task gradients (PCGrad, CAGrad) keep one forward pass per task on purpose: after one
shared forward pass, each task's backward pass would run through the whole concatenated graph (the other
tasks' rows get zero gradients, but are computed), so N backward passes would cost N x the concatenated
batch's backward instead of the sum of the per-task ones (a 4-layer BERT, 3 tasks of 16 rows: 314 ms for a
shared forward pass and 3 backward passes, 106 ms for a forward and backward pass per task; MiniLM on the seed
mixture, bf16: 1.68 s against 0.60 s).

With several processes (Accelerate/DDP, see :mod:`multitune.training.distributed`), DDP cannot sync a
step of several forward passes (one per task) or of several backward passes: such steps run the forward
passes on the unwrapped model (:attr:`WeightedStep.module`), so DDP does not take part, and
:meth:`WeightedStep.combine` averages the gradients over processes itself, in one flat all-reduce (the
per-task vectors and the other trained parameters' gradients) before the strategy combines them; every
process then combines the same gradients. The losses handed to :meth:`LossWeighting.step` are averaged
over processes too, so the strategy's state stays identical on every process.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from multitune.backbones.unpadded import runs_unpadded
from multitune.errors import ConfigError, MultituneError
from multitune.tasks.base import EncoderCall
from multitune.weighting import LossWeighting

#: the padded tokens a shared backbone pass may add, as a share of those of the tasks' own batches: about
#: what one pass saves on a CPU (a GradNorm step on MiniLM, batches of equal widths: 1.2x faster)
MAX_EXTRA_PADDING = 0.15


def shared_parameters(model: nn.Module, trainable: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """The trainable parameters of a :class:`~multitune.model.MultiTaskModel` that more than one task's loss
    reaches: the backbone's and those of adapters used by several tasks (``shared`` arrangements, with a
    shared-conditioned set's task embeddings); not the heads, nor an adapter (or fusion layer) that only
    one task goes through. In module order.

    Args:
        model: the unwrapped multi-task model.
        trainable: the parameters the optimizer trains (including any that gradual unfreezing releases later).
    """
    specific = {id(p) for p in model.heads.parameters()}
    if model.adapters is not None:
        users = Counter(id(p) for t in model.adapters.task_names for p in model.adapters.parameters_of(t))
        specific |= {i for i, n in users.items() if n == 1}
    wanted = {id(p) for p in trainable}
    return [p for p in model.parameters() if id(p) in wanted and id(p) not in specific]


def _reached(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors ``loss`` back-propagates into (a walk of its autograd graph, no computing)."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            found.add(id(variable))
        stack.extend(n for n, _ in node.next_functions)
    return found


def last_shared_layer(losses: dict[str, torch.Tensor], shared: Sequence[nn.Parameter]) -> nn.Parameter:
    """GradNorm's W: the last (in module order) shared weight matrix that every task's loss reaches. An
    unused pooler, or a decoder that only text-to-text tasks use, is passed over.

    Raises:
        MultituneError: no shared weight matrix is reached by every task.
    """
    common = set.intersection(*(_reached(loss) for loss in losses.values()))
    for p in reversed(shared):
        if p.ndim >= 2 and id(p) in common:
            return p
    raise MultituneError(f"loss_weighting.strategy: no trainable shared layer is reached by every task "
                         f"({', '.join(losses)}); use a strategy that does not need one")


class WeightedStep:
    """The parts of the training loop's step that depend on what the loss weighting needs.

    Args:
        weighting: the run's loss weighting.
        sampler: the task sampler (its tasks with a non-zero share are "every task").
        model: the model as prepared by Accelerate (possibly DDP-wrapped).
        core: the unwrapped model.
        trainable: every parameter the optimizer trains.
        accelerator: the run's Accelerator.

    Raises:
        ConfigError: the strategy works on shared parameters and the run trains none (e.g. per-task
            adapters on a frozen backbone, or a frozen backbone without adapters).
    """

    def __init__(self, weighting: LossWeighting, sampler: Any, model: nn.Module, core: nn.Module,
                 trainable: Sequence[nn.Parameter], accelerator: Any):
        self.weighting, self.sampler, self.core = weighting, sampler, core
        self.accelerator = accelerator
        self.names = list(core.tasks)
        self.every_task = [n for n in self.names if sampler.probabilities().get(n, 0.0) > 0]
        self.per_task = weighting.needs_per_task_gradients
        self.shared: list[nn.Parameter] = []
        if self.per_task or weighting.needs_shared_layer:
            self.shared = shared_parameters(core, trainable)
            if not self.shared:
                raise ConfigError("loss_weighting.strategy", f"{weighting.config.strategy} works on the parameters "
                                  f"that the tasks share, and this run trains none (per-task adapters or a frozen "
                                  f"backbone); use adapters.arrangement shared or a loss-level strategy")
        trained = {id(p) for p in trainable}
        self.trained = [p for p in core.parameters() if id(p) in trained]
        # several forward or backward passes per step: DDP stays out and the gradients are averaged here
        self.sync_here = accelerator.num_processes > 1 and (weighting.needs_all_tasks or self.per_task)
        self.module = core if self.sync_here else model  # what the loop runs forward passes with
        self.layer: nn.Parameter | None = None
        self.max_extra_padding = MAX_EXTRA_PADDING
        self.begin()

    def begin(self) -> None:
        """Forget the previous step (call at the start of every step)."""
        self.live = [p for p in self.shared if p.requires_grad]  # gradual unfreezing changes the set
        self.grads: dict[str, torch.Tensor] = {}
        self.touched: set[int] = set()
        self.loss_sum = dict.fromkeys(self.names, 0.0)
        self.loss_count = dict.fromkeys(self.names, 0)
        self.batches: list[dict[str, dict]] = []

    def parts(self) -> list[list[str]]:
        """The tasks of one micro-step, grouped by backward pass."""
        tasks = self.every_task if self.weighting.needs_all_tasks else [self.sampler.next_task()]
        return [[t] for t in tasks] if self.per_task else [tasks]

    def shares(self) -> dict[str, float]:
        """The share of batches each task gets (for the eval lines of metrics.jsonl)."""
        if self.weighting.needs_all_tasks:
            return {n: 1.0 / len(self.every_task) for n in self.every_task}
        return self.sampler.probabilities()

    def keep(self, batches: dict[str, dict]) -> None:
        """Remember a part's batches (task -> batch) when the strategy wants their losses after the update."""
        if self.weighting.needs_losses_after_step:
            self.batches.append(batches)

    def losses(self, batches: dict[str, dict], module: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Each task's loss on its batch of a part (task -> batch, in the part's order): one backbone pass for
        the tasks that can share one (:meth:`sharing`), a forward pass of its own for each other task.

        Args:
            batches: task -> batch, on the device.
            module: what runs the forward passes (default :attr:`module`; the shared pass needs the unwrapped
                model, as a DDP module syncs gradients per forward pass of its own).
        """
        module = self.module if module is None else module
        shared = self.sharing(batches) if module is self.core else {}
        calls = [c for own in shared.values() for c in own]
        out = {}
        with self.core.shared_encoding(calls, list(shared)) if shared else contextlib.nullcontext():
            for name in shared:
                out[name] = module(name, batches[name]).loss
        for name in batches:
            if name not in out:
                out[name] = module(name, batches[name]).loss
        return {n: out[n] for n in batches}

    def sharing(self, batches: dict[str, dict]) -> dict[str, list[EncoderCall]]:
        """The tasks of a part that one backbone pass serves, with their encoder inputs: those that declare them
        (:meth:`~multitune.tasks.base.Task.encoder_inputs`), when there are two or more, the backbone computes
        the same for all of them (:meth:`~multitune.model.MultiTaskModel.shares_backbone`) and padding them to
        the longest adds at most ``max_extra_padding`` (:data:`MAX_EXTRA_PADDING`) padded tokens, or the backbone
        runs unpadded (``training.unpadded``), where the padding added costs nothing; else none."""
        declared = {n: self.core.tasks[n].encoder_inputs(b) for n, b in batches.items()}
        shared = {n: calls for n, calls in declared.items() if calls is not None}
        if len(shared) < 2 or not self.core.shares_backbone(list(shared)):
            return {}
        if self.core.unpadded and runs_unpadded(self.core.architecture.token_model(self.core.backbone)):
            return shared  # the token-wise layers skip padding, so joining the batches adds no work there
        ids = [c[0] for calls in shared.values() for c in calls]
        own = sum(i.numel() for i in ids)
        return shared if sum(map(len, ids)) * max(i.shape[1] for i in ids) <= (1 + self.max_extra_padding) * own else {}

    def weigh(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss weighting applied to a part's losses."""
        if not self.weighting.needs_shared_layer:
            return self.weighting(losses)
        if self.layer is None or not self.layer.requires_grad:
            self.layer = last_shared_layer(losses, self.live)
        return self.weighting(losses, shared_layer=self.layer)

    def backward(self, loss: torch.Tensor, values: dict[str, float]) -> None:
        """Back-propagate a part's weighted loss; with per-task gradients, set the shared part aside."""
        self.accelerator.backward(loss)
        for n, v in values.items():
            self.loss_sum[n] += v
            self.loss_count[n] += 1
        if self.per_task and self.live:
            (task,) = values
            vector = self.grads.get(task)
            if vector is None:
                vector = torch.zeros(sum(p.numel() for p in self.live), device=self.live[0].device)
            offset = 0
            for p in self.live:
                if p.grad is not None:
                    vector[offset:offset + p.numel()] += p.grad.reshape(-1)
                    self.touched.add(id(p))
                    p.grad = None
                offset += p.numel()
            self.grads[task] = vector

    def combine(self) -> None:
        """Average the gradients over processes where DDP did not, then let a gradient-level strategy combine
        the per-task gradients into the shared parameters' gradient (call once per step, before clipping)."""
        if self.sync_here:
            self._average_gradients()
        if not self.per_task or not self.grads:
            return
        combined = self.weighting.combine(self.grads)
        offset = 0
        for p in self.live:
            if id(p) in self.touched:  # a parameter no task reached keeps no gradient (AdamW skips it)
                p.grad = combined[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def _average_gradients(self) -> None:
        # every process ran the same tasks, so the same parameters have gradients, in the same order
        held = [p for p in self.trained if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in self.grads.values()] + [p.grad.reshape(-1) for p in held])
        flat = self.accelerator.reduce(flat, reduction="mean")
        pieces = iter(flat.split([g.numel() for g in self.grads.values()] + [p.numel() for p in held]))
        self.grads = {n: next(pieces) for n in self.grads}
        for p in held:
            p.grad = next(pieces).view_as(p).to(p.grad.dtype)

    def after_step(self, autocast: Callable[[], Any]) -> None:
        """Tell the strategy the step's losses (and, if it wants them, the losses after the update)."""
        before = self._means(self.loss_sum, self.loss_count)
        after = None
        if self.weighting.needs_losses_after_step:
            sums, counts = dict.fromkeys(self.names, 0.0), dict.fromkeys(self.names, 0)
            with torch.no_grad(), autocast():
                for batches in self.batches:
                    for name, loss in self.losses(batches, self.core).items():
                        sums[name] += float(loss)
                        counts[name] += 1
            after = self._means(sums, counts)
        self.weighting.step(before, after)

    def _means(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Per-task means over the step's batches (and over processes)."""
        totals = torch.tensor([[sums[n] for n in self.names], [counts[n] for n in self.names]],
                              dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return {n: float(totals[0, i] / totals[1, i]) for i, n in enumerate(self.names) if totals[1, i] > 0}
