"""Export a multi-task model to one ONNX graph: one backbone pass, every head task's raw outputs and the
sentence embedding, for onnxruntime (see docs/onnx.md).

The directory written::

    model.onnx      the graph (weights inside; beside it in model.onnx.data only past ONNX's 2 GB limit)
    onnx.json       input and output names, opset, which outputs each task reads, labels
    multitune.json  the tasks as the model writes them (label maps, thresholds, pooling, max_length)
    tokenizer files the backbone's tokenizer (``save_pretrained``)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import secrets
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from multitune.errors import MultituneError
from multitune.fileio import replace_dir, write_json_atomic
from multitune.onnx.files import (
    GRAPH_FILE,
    IN_GRAPH,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    ONNX_META_FILE,
    SENTENCE_EMBEDDING,
    require,
)
from multitune.onnx.graph import INPUT_NAMES, MultiTaskGraph, TaskPlan, plan_task
from multitune.rundir import check_output_dir, write_marker

#: texts of the batch that is traced and of the one that checks the written graph (other sizes, padded)
_TRACE_TEXTS = ["the first text of the trace batch, the longest of the three", "a second text", "third"]
_CHECK_TEXTS = ["one", "a check that the graph follows other batch and sequence sizes", "two words",
                "and a fourth text of middling length"]
#: the oldest opset with the backbone's operators (LayerNormalization is an ONNX operator from opset 17)
MIN_OPSET = 17
#: largest difference from PyTorch tolerated in the written graph's outputs, relative to their scale
_CHECK_TOLERANCE = 1e-3


def export_onnx(model: Any, output: str | Path, tasks: Sequence[str] | None = None, opset: int | None = None,
                overwrite: bool = False) -> dict:
    """Write ``model`` as one ONNX graph with its tokenizer and task settings (see the module docstring).

    Inputs of the graph: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes
    them and the backbone reads them), int64 [batch, sequence], both axes dynamic. Outputs: for each head
    task its raw outputs, named ``<task>.<key>`` (``sentiment.logits`` [batch, labels], ``ner.logits``
    [batch, sequence, labels], ``similarity.scores`` [batch]), then ``sentence_embedding`` [batch, hidden].
    Pair tasks read the tokenizer's pair encoding of the same inputs; a bi-encoder regression is computed
    outside the graph from the embeddings of its two texts. Text-to-text and masked-LM tasks are not in the
    graph: named in ``tasks`` they are an error, otherwise they are left out and listed in the report.

    Args:
        model: a :class:`~multitune.model.MultiTaskModel` with an encoder backbone, in fp32, without
            separate adapters (merge LoRA into the backbone first: ``multitune export --merge``).
        output: the directory to write (written beside it under a temporary name, then renamed).
        tasks: the tasks to put in the graph (default: every task the graph can hold).
        opset: the ONNX opset, 17 or newer (default: torch's, 20 in torch 2.13).
        overwrite: replace a non-empty ``output``.

    Returns:
        A report: ``output``, ``tasks`` (in the graph), ``excluded`` (task -> reason), ``inputs``,
        ``outputs`` (name -> axes), ``opset``, ``max_abs_diff`` (of the written graph on onnxruntime against
        PyTorch on a check batch), ``files`` and ``bytes``.

    Raises:
        MultituneError: an unknown task, a task the graph cannot hold named in ``tasks``, a model with
            adapters or a non-encoder backbone or in another precision, an opset before 17 or one the
            exporter does not write, a non-empty ``output`` without ``overwrite``, the onnx extra missing, or a
            graph that does not reproduce the model.
    """
    require("onnx")
    require("onnxruntime")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        raise MultituneError(f"opset: expected an integer from {MIN_OPSET} (the ONNX version of the backbone's "
                             f"layer normalisation), got {opset!r}")
    output = Path(output)
    plans, excluded = select_tasks(model, tasks)
    _check_model(model)
    check_output_dir(output, overwrite=overwrite, resume=False, field="--output", kind="export")
    output.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (not mkdtemp, which makes it private): the directory keeps the umask's permissions
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    was_training = model.training
    model.eval()
    try:
        graph = MultiTaskGraph(model, plans).eval()
        input_names = _input_names(model)
        _trace(graph, model, input_names, tmp / GRAPH_FILE, opset)
        max_diff = _check_graph(graph, model, input_names, tmp / GRAPH_FILE)
        axes, opset_used = _graph_outputs(tmp / GRAPH_FILE)
        if opset is not None and opset_used != opset:
            raise MultituneError(f"opset: torch.onnx.export wrote opset {opset_used}, not {opset}")
        model.tokenizer.save_pretrained(tmp)
        meta = model.metadata()
        meta["tasks"] = {p.name: meta["tasks"][p.name] for p in plans}
        write_json_atomic(tmp / "multitune.json", meta)
        hidden = axes[SENTENCE_EMBEDDING][-1]
        write_json_atomic(tmp / ONNX_META_FILE, {
            "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "opset": opset_used,
            "inputs": input_names, "outputs": axes, "hidden_size": hidden,
            "tasks": {p.name: _task_entry(model, p) for p in plans}, "excluded": excluded,
            "exporter": f"torch {torch.__version__.split('+')[0]}, torch.onnx.export(dynamo=True)"})
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        write_marker(tmp, "export")
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    return {"output": str(output), "format": "onnx", "tasks": [p.name for p in plans], "excluded": excluded,
            "inputs": input_names, "outputs": axes, "opset": opset_used, "max_abs_diff": max_diff,
            "files": files, "bytes": size}


def select_tasks(model: Any, tasks: Sequence[str] | None = None) -> tuple[list[TaskPlan], dict[str, str]]:
    """The tasks that go into the graph, and those left out.

    Args:
        model: a :class:`~multitune.model.MultiTaskModel`.
        tasks: task names (duplicates dropped), or None for every task the graph can hold.

    Returns:
        ``(plans, excluded)``: a :class:`~multitune.onnx.graph.TaskPlan` per task in the graph, in the model's
        task order (or ``tasks`` order), and task name -> one-line reason for the tasks left out.

    Raises:
        MultituneError: an empty list, an unknown task, or a named task that the graph cannot hold.
    """
    if tasks is not None and not list(tasks):
        raise MultituneError("--task: give at least one task, or leave it out to export every task")
    names = list(model.tasks) if tasks is None else list(dict.fromkeys(tasks))
    for name in names:
        if name not in model.tasks:
            raise MultituneError(f"the model has no task {name!r}; its tasks: {', '.join(model.tasks)}")
    was_training = model.training
    model.eval()
    try:
        plans, excluded = [], {}
        for name in names:
            plan = plan_task(model, name)
            if isinstance(plan, TaskPlan):
                plans.append(plan)
            elif tasks is not None:
                raise MultituneError(f"task {name!r} ({model.tasks[name].config.type}) cannot be exported to "
                                     f"ONNX: {plan}; export the model's other tasks")
            else:
                excluded[name] = f"{model.tasks[name].config.type}: {plan}"
    finally:
        model.train(was_training)
    return plans, excluded


def _check_model(model: Any) -> None:
    """Refuse what the graph cannot represent faithfully, each with one line saying what to do instead."""
    if model.adapters is not None:
        raise MultituneError("ONNX export needs the adapters merged into the backbone: export one task merged "
                             "(multitune export RUN --task T --merge --format onnx --output DIR)")
    family = model.architecture.type_name
    if family != "encoder":
        raise MultituneError(f"ONNX export covers encoder backbones; this model's backbone is {family}")
    if model.inference_precision != "fp32":
        raise MultituneError(f"ONNX export needs the model in fp32; it was loaded with precision "
                             f"{model.inference_precision} (load it without --precision)")


def _input_names(model: Any) -> list[str]:
    """``input_ids``, ``attention_mask``, and ``token_type_ids`` when the tokenizer makes them and the
    backbone's token model takes them (else they would be a graph input that nothing reads)."""
    enc = model.tokenizer("a", "b")
    module = model.architecture.token_model(model.backbone)
    try:
        takes_types = "token_type_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        takes_types = False
    return [n for n in INPUT_NAMES if n != "token_type_ids" or ("token_type_ids" in enc and takes_types)]


def _encode(model: Any, texts: list[str], input_names: list[str]) -> tuple[torch.Tensor, ...]:
    enc = model.tokenizer(texts, truncation=True, max_length=model.max_length, padding=True, return_tensors="pt")
    return tuple(enc[n].to(model.device) for n in input_names)


def _trace(graph: MultiTaskGraph, model: Any, input_names: list[str], path: Path, opset: int | None) -> None:
    """Write the graph with ``torch.onnx.export``.

    The dynamo exporter (torch.export) is used, not the TorchScript tracer (``dynamo=False``): both give the
    same numbers for BERT in torch 2.13, but the tracer records Python branches on tensor sizes as constants
    (it warns so in transformers' mask code), which can silently fix a shape; torch.export instead proves
    the batch and sequence axes dynamic or fails, and is torch's maintained path.
    """
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    args = _encode(model, _TRACE_TEXTS, input_names)
    dynamic = tuple({0: batch, 1: sequence} for _ in args)
    try:
        with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export"), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notices
            program = torch.onnx.export(graph, args, None, input_names=input_names,
                                        output_names=graph.output_names(), dynamic_shapes=dynamic,
                                        opset_version=opset, dynamo=True, verbose=False)
            program.save(str(path))
    except Exception as exc:
        first = " ".join(str(exc).split())[:300]
        raise MultituneError(f"torch.onnx.export failed: {type(exc).__name__}: {first}") from exc


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Silence the exporter's log lines below errors (e.g. that torchvision's operators are not registered)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_graph(graph: MultiTaskGraph, model: Any, input_names: list[str], path: Path) -> float:
    """Run the written graph on onnxruntime on a batch of other sizes than the traced one and compare with
    PyTorch; returns the largest absolute difference.

    Raises:
        MultituneError: an output differs by more than the tolerance (relative to the output's scale).
    """
    ort = require("onnxruntime")
    args = _encode(model, _CHECK_TEXTS, input_names)
    with torch.inference_mode():
        expected = [t.float().cpu().numpy() for t in graph(*args)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(graph.output_names(), {n: a.cpu().numpy() for n, a in zip(input_names, args)})
    worst = 0.0
    for name, want, have in zip(graph.output_names(), expected, got):
        if want.shape != have.shape:
            raise MultituneError(f"the exported graph's {name} has shape {list(have.shape)}, PyTorch's "
                                 f"{list(want.shape)}")
        diff = float(abs(want - have).max()) if want.size else 0.0
        if diff > _CHECK_TOLERANCE * max(1.0, float(abs(want).max()) if want.size else 0.0):
            raise MultituneError(f"the exported graph's {name} differs from PyTorch by {diff:.2e}")
        worst = max(worst, diff)
    return worst


def _graph_outputs(path: Path) -> tuple[dict[str, list], int]:
    """Each output's axes (``batch``/``sequence`` for dynamic ones, sizes for fixed ones) and the opset."""
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    axes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    for name, dims in axes.items():
        if not dims or dims[0] != "batch":
            raise MultituneError(f"the exported graph's {name} has axes {dims}; expected a batch axis first")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return axes, int(opset)


def _task_entry(model: Any, plan: TaskPlan) -> dict:
    """What a user of plain onnxruntime needs to read a task's answer off the graph (see docs/onnx.md)."""
    task = model.tasks[plan.name]
    entry: dict[str, Any] = {"type": task.config.type, "input": "pair" if task.pair_input else "text",
                             "computed": plan.mode}
    if plan.mode == IN_GRAPH:
        entry["outputs"] = {key: f"{plan.name}.{key}" for key in plan.outputs}
    else:  # FROM_EMBEDDINGS: computed outside the graph from the embeddings of the input's texts
        entry["outputs"] = {}
        entry["from"] = SENTENCE_EMBEDDING
    labels = task.state().get("labels")
    if labels:
        entry["labels"] = list(labels)
    return entry
