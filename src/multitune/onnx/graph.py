"""Which tasks of a model an ONNX graph can hold, and the module that is traced into that graph.

A task is asked, not named: its inference runs once on a small probe batch against a stand-in for the
model that records every backbone call (``encode`` / ``embed``) and every batch field read. Then:

- it only reads the token inputs and runs the backbone on them: its head goes into the graph
  (classification, token classification, cross-encoder regression);
- it runs ``embed`` on other inputs (the two texts of a pair) through a head without parameters: its
  prediction is computed outside the graph from the graph's sentence embeddings, with the task's own code
  (bi-encoder regression: the cosine of the two embeddings);
- anything else stays out, with the reason: tasks that generate (text-to-text) or that read more than the
  tokens (masked-LM scoring reads the masked tokens' labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from multitune.onnx.files import FROM_EMBEDDINGS, IN_GRAPH, SENTENCE_EMBEDDING

#: the graph's inputs, in order (``token_type_ids`` only when the tokenizer makes them and the backbone reads them)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_PROBE_TEXTS = ("a probe text to trace the graph, long enough to pad the other", "short one")
_PROBE_PAIRS = ("and its second text", "another")


@dataclass
class TaskPlan:
    """How one task is computed from the graph.

    Attributes:
        name: the task.
        mode: ``graph`` (its head is in the graph) or ``embeddings`` (computed from sentence embeddings).
        outputs: the task's output keys (``logits``, ``scores``...), each a graph output ``<name>.<key>``;
            empty for ``embeddings``.
    """

    name: str
    mode: str
    outputs: list[str] = field(default_factory=list)

    def output_names(self) -> list[str]:
        """The graph outputs this task reads, in order."""
        if self.mode == FROM_EMBEDDINGS:
            return [SENTENCE_EMBEDDING]
        return [f"{self.name}.{key}" for key in self.outputs]


class _ReadFields(dict):
    """A batch that remembers which fields were read."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


class _Recorder:
    """Stands in for the model while a task's inference runs on the probe batch: records each backbone call
    (its kind and its ``input_ids`` tensor) and computes it on the real model."""

    def __init__(self, model: Any):
        self._model = model
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        self.calls.append(("encode", input_ids))
        return self._model.encode(input_ids, attention_mask, token_type_ids)

    def embed(self, input_ids, attention_mask, token_type_ids=None):
        self.calls.append(("embed", input_ids))
        return self._model.embed(input_ids, attention_mask, token_type_ids)


def probe_batch(model: Any, task: Any) -> dict[str, torch.Tensor]:
    """A two-row batch of ``task`` (rows of different lengths, so one is padded), without labels.

    Args:
        model: the :class:`~multitune.model.MultiTaskModel`.
        task: one of its tasks.

    Returns:
        The collated batch on the model's device.
    """
    raw = list(zip(_PROBE_TEXTS, _PROBE_PAIRS)) if task.pair_input else list(_PROBE_TEXTS)
    examples = [task.example_from_input(x) for x in raw]
    feats = task.encode(examples, model.tokenizer, model.max_length)
    batch = task.collate(feats, model.tokenizer.pad_token_id or 0, torch.Generator().manual_seed(0))
    return {k: v.to(model.device) for k, v in batch.items() if k != "labels"}


@torch.inference_mode()
def plan_task(model: Any, name: str) -> TaskPlan | str:
    """Decide how task ``name`` is computed from the graph (see the module docstring).

    Args:
        model: an fp32 :class:`~multitune.model.MultiTaskModel` in eval mode, without adapters.
        name: one of its tasks.

    Returns:
        The task's plan, or a one-line reason why the graph cannot hold it.
    """
    task = model.tasks[name]
    if not task.reads_token_states:
        return "it generates text step by step with the backbone's decoder, which the graph does not hold"
    batch = _ReadFields(probe_batch(model, task))
    recorder = _Recorder(model)
    try:
        result = task.infer(recorder, model.heads[name], batch)
    except KeyError as exc:
        return f"its inference reads {exc.args[0]!r} besides the token inputs"
    extra = sorted(batch.read - set(INPUT_NAMES))
    tokens = dict.__getitem__(batch, "input_ids")
    on_tokens = all(ids.data_ptr() == tokens.data_ptr() and ids.shape == tokens.shape for _, ids in recorder.calls)
    rows = len(tokens)
    if recorder.calls and on_tokens and not extra:
        outputs = list(result.outputs)
        if not outputs or any(not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != rows
                              for v in result.outputs.values()):
            return "its outputs are not one row per input"
        return TaskPlan(name, IN_GRAPH, outputs)
    head = model.heads[name]
    parameterless = not any(True for _ in head.parameters()) and not any(True for _ in head.buffers())
    if recorder.calls and all(kind == "embed" for kind, _ in recorder.calls) and parameterless:
        return TaskPlan(name, FROM_EMBEDDINGS)
    return (f"its inference reads {', '.join(extra) or 'other inputs'} besides the token inputs and runs "
            f"the backbone on them through a head with parameters")


class _SharedStates:
    """Stands in for the model inside a task's inference in the graph: ``encode`` gives the one backbone pass's
    token states (the plan guarantees a graph task only encodes the graph's own inputs)."""

    def __init__(self, model: Any, hidden: torch.Tensor):
        self._model = model
        self._hidden = hidden

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        return self._hidden

    def embed(self, input_ids, attention_mask, token_type_ids=None):
        emb = self._model.pool(self._hidden, attention_mask)
        return F.normalize(emb, dim=-1) if self._model.normalize_embeddings else emb


class MultiTaskGraph(nn.Module):
    """One backbone pass, then every planned head and the sentence embedding: the module traced into ONNX.

    Args:
        model: the :class:`~multitune.model.MultiTaskModel` (its weights are the graph's).
        plans: the tasks whose heads are in the graph (``graph`` plans), in output order.

    Outputs, in order: each plan's outputs (``<task>.<key>``), then ``sentence_embedding`` (pooled token
    states, L2-normalised when the model is configured so).
    """

    def __init__(self, model: Any, plans: list[TaskPlan]):
        super().__init__()
        self.model = model
        self.plans = [p for p in plans if p.mode == IN_GRAPH]

    def output_names(self) -> list[str]:
        """The graph's output names, in the order :meth:`forward` returns them."""
        return [n for p in self.plans for n in p.output_names()] + [SENTENCE_EMBEDDING]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        hidden = self.model.encode(input_ids, attention_mask, token_type_ids)
        shared = _SharedStates(self.model, hidden)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        outputs: list[torch.Tensor] = []
        for plan in self.plans:
            result = self.model.tasks[plan.name].infer(shared, self.model.heads[plan.name], batch)
            outputs.extend(result.outputs[key] for key in plan.outputs)
        outputs.append(shared.embed(input_ids, attention_mask, token_type_ids))
        return tuple(outputs)
