"""Mixed-task inference: one batch whose rows belong to different tasks, each row through its own adapter
and head, with one backbone forward pass for every task that reads token states
(:meth:`multitune.model.MultiTaskModel.predict_mixed`).

How: each task's inference runs twice against a stand-in for the model. The first run records the
backbone inputs the task asks for (its ``encode`` calls) and gets zeros back; all recorded rows are then
padded together and encoded in one pass, routed per row (a row that several tasks ask for, with the same
tokens and adapter, only once); the second run hands each task its rows of that pass. Generative tasks
(text-to-text) drive the backbone themselves and run as their own group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

from multitune.backbones.architectures import _pad
from multitune.errors import MultituneError


class _SharedPass:
    """Stands in for the model inside ``task.infer``: ``encode`` records, or replays states of the shared
    pass; everything else is the model's."""

    def __init__(self, model: Any):
        self._model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.states: list[torch.Tensor] | None = None
        self._next = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        if self.states is None:
            self.calls.append((input_ids, attention_mask, token_type_ids))
            return torch.zeros(*input_ids.shape, self._model.hidden_size, device=input_ids.device)
        out = self.states[self._next]
        self._next += 1
        return out

    def embed(self, input_ids, attention_mask, token_type_ids=None):
        emb = self._model.pool(self.encode(input_ids, attention_mask, token_type_ids), attention_mask)
        return F.normalize(emb, dim=-1) if self._model.normalize_embeddings else emb


def _adapter_key(model: Any, task: str) -> str | None:
    """What decides a row's backbone states besides its tokens: nothing without adapters, the task's adapter
    with plain per-task or shared adapters, the task itself with task embeddings or AdapterFusion."""
    adapters = model.adapters
    if adapters is None:
        return None
    if adapters.task_embeddings is None and adapters.fusion is None:
        return adapters.assignment[task]
    return task


@torch.inference_mode()
def predict_mixed(model: Any, requests: Sequence[tuple[str, Any]]) -> list[Any]:
    """Predictions for ``(task, input)`` pairs, in order, computed as one mixed batch.

    Returns:
        One JSON-able prediction per request, as :meth:`multitune.model.MultiTaskModel.predict` gives
        it.

    Raises:
        MultituneError: a request names a task the model does not have.
    """
    for task, _ in requests:
        if task not in model.tasks:
            raise MultituneError(f"the model has no task {task!r}; its tasks: {', '.join(model.tasks)}")
    was_training = model.training
    model.eval()
    pad_id = model.tokenizer.pad_token_id or 0
    groups: dict[str, list[int]] = {}
    for i, (task, _) in enumerate(requests):
        groups.setdefault(task, []).append(i)
    out: list[Any] = [None] * len(requests)
    try:
        prepared = {}
        for name, idx in groups.items():
            t = model.tasks[name]
            examples = [t.example_from_input(requests[i][1]) for i in idx]
            feats = t.encode(examples, model.tokenizer, model.max_length)
            batch = t.collate(feats, pad_id, torch.Generator().manual_seed(0))
            prepared[name] = (t, examples, {k: v.to(model.device) for k, v in batch.items()})
        shared = {n: _SharedPass(model) for n, (t, _, _) in prepared.items() if t.reads_token_states}
        for name, proxy in shared.items():  # pass 1: record what each task encodes
            t, _, batch = prepared[name]
            t.infer(proxy, model.heads[name], batch)
        calls = [(name, c) for name, proxy in shared.items() for c in proxy.calls]
        if calls:
            rows = [(name, ids[r], mask[r], None if tti is None else tti[r])
                    for name, (ids, mask, tti) in calls for r in range(len(ids))]
            lengths = [int(m.sum()) for _, _, m, _ in rows]
            # a row that two tasks ask for (same adapter, same tokens) is encoded once: e.g. one text for a
            # classifier and a tagger of a model without per-task adapters
            keys = [(_adapter_key(model, r[0]), tuple(r[1][:n].tolist()),
                     None if r[3] is None else tuple(r[3][:n].tolist())) for r, n in zip(rows, lengths)]
            unique = list(dict.fromkeys(keys))
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            ids = _pad([list(k[1]) for k in unique], pad_id).to(model.device)
            mask = _pad([[1] * len(k[1]) for k in unique], 0).to(model.device)
            tti = None
            if any(k[2] is not None for k in unique):
                tti = _pad([list(k[2]) if k[2] is not None else [0] * len(k[1]) for k in unique], 0).to(model.device)
            with model.route([rows[first[k]][0] for k in unique]):  # one pass, each row through its adapter
                hidden = model.encode(ids, mask, tti)
            position = {k: j for j, k in enumerate(unique)}
            hidden = hidden[torch.tensor([position[k] for k in keys], device=hidden.device)]
            start = 0
            for name, (c_ids, _, _) in calls:  # pass 2: give each call its rows, at its own width
                shared[name].states = shared[name].states or []
                shared[name].states.append(hidden[start:start + len(c_ids), : c_ids.shape[1]])
                start += len(c_ids)
        for name, (t, examples, batch) in prepared.items():
            if name in shared:
                result = t.infer(shared[name], model.heads[name], batch)
            else:
                result = model.infer(name, batch)
            for i, p in zip(groups[name], t.decode(result, batch, examples)):
                out[i] = p
    finally:
        model.train(was_training)
    return out
