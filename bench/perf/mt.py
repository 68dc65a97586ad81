"""multitune in the suite: training runs through the Python API, inference over the mixture's model, and the
scaling curves (number of tasks, data size).

The config of every run is built here from the suite's shared settings: round-robin task sampling (each task
of the mixture gets exactly a third of the steps, as the three HF Trainers do), summed losses, one evaluation
at the end only (``eval_every = max_steps``). ``wall_s`` in results.json times the optimizer steps only.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from perf.common import METRIC, SINGLE, TASK, peak_rss_gb, read_jsonl, write_jsonl


def task_section(workload: str, train: str, validation: str) -> dict:
    data = {"train": {"path": train, "format": "jsonl"}, "validation": {"path": validation, "format": "jsonl"}}
    if workload == "sst2":
        return {"type": "classification", "data": data}
    if workload == "wnut17":
        return {"type": "token_classification", "data": data}
    return {"type": "regression", "label_range": [0, 5], "data": data}


def run_config(spec: dict, tasks: dict[str, dict], steps: int, output_dir: str, compile_model: bool = False) -> dict:
    s = spec["settings"]
    if compile_model:  # an evaluation at step 10 splits the compile-laden first steps from the steady ones
        return {**run_config(spec, tasks, steps, output_dir),
                "training": {**run_config(spec, tasks, steps, output_dir)["training"], "compile": True,
                             "eval_every": min(10, steps)}}
    return {"backbone": "default", "output_dir": output_dir, "seed": s["seed"], "tasks": tasks,
            "sampling": {"strategy": "round_robin"}, "loss_weighting": {"strategy": "sum"},
            "training": {"max_steps": steps, "batch_size": s["batch_size"], "max_length": s["max_length"],
                         "learning_rate": s["learning_rate"], "weight_decay": s["weight_decay"],
                         "warmup_steps": int(s["warmup_ratio"] * steps), "scheduler": "linear",
                         "eval_every": steps, "precision": spec["multitune_precision"],
                         "group_by_length": True,  # the default (written out: the suite compares it with HF tuned)
                         "per_task_best": False}}  # one evaluation at the end: nothing to select per task


class _Tee(io.TextIOBase):
    """The run's console output to stderr (the child's log) and to a buffer the bench reads figures from."""

    def __init__(self):
        self.buffer_ = io.StringIO()

    def write(self, text: str) -> int:
        sys.stderr.write(text)
        return self.buffer_.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def train(spec: dict, tasks: dict[str, dict], steps: int, output_dir: str,
          compile_model: bool = False) -> tuple[dict, dict]:
    """Run ``multitune.training.train``; returns results.json and what the bench measures around it:
    the call's wall time and the tokenisation time the trainer prints."""
    from rich.console import Console

    from multitune.config import parse_config
    from multitune.training import train as mt_train

    config = parse_config(run_config(spec, tasks, steps, output_dir, compile_model))
    tee = _Tee()
    t0 = time.perf_counter()
    results = mt_train(config, overwrite=True, progress=False, console=Console(file=tee, width=120))
    call_s = time.perf_counter() - t0
    # the checkpoints (model + optimizer, ~0.5 GB a run) are not needed once the run has finished
    shutil.rmtree(Path(output_dir) / "checkpoints", ignore_errors=True)
    tokenize_s = results["train"].get("tokenize_s")
    if tokenize_s is None:  # results.json written before the trainer recorded it: read the console line
        match = re.search(r"tokenised every split once in ([\d.]+)s", tee.buffer_.getvalue())
        tokenize_s = float(match.group(1)) if match else None
    return results, {"call_s": call_s, "tokenize_s": tokenize_s}


def _record(results: dict, extra: dict) -> dict:
    t = results["train"]
    seconds = t["wall_s"]
    # exact token totals when results.json has them, else rebuilt from the (rounded) rates
    record = {"steps": t["steps"], "train_s": seconds, "examples": t["examples"],
              "real_tokens": t.get("real_tokens", round(t["real_tokens_per_s"] * seconds)),
              "padded_tokens": t.get("padded_tokens", round(t["padded_tokens_per_s"] * seconds)),
              "examples_per_s": t["examples_per_s"],
              "real_tokens_per_s": t["real_tokens_per_s"], "padded_tokens_per_s": t["padded_tokens_per_s"],
              "precision": t["precision"], **extra}
    return record


def run(workload: str, spec: dict, compile_model: bool = False) -> dict:
    """One workload (a single task, or the three tasks as one run) with multitune; with ``compile_model``
    the backbone goes through ``torch.compile`` (``training.compile``) and the record separates the first
    10 steps, which pay for compilation, from the steady ones."""
    names = SINGLE if workload == "mixture" else (workload,)
    tasks = {TASK[w]: task_section(w, spec["data"][w]["train"], spec["data"][w]["validation"]) for w in names}
    out = str(Path(spec["models_dir"]) / f"{workload}-multitune{'-compile' if compile_model else ''}")
    results, measured = train(spec, tasks, spec["steps"][workload], out, compile_model)
    dev = {w: results["validation"][TASK[w]][METRIC[w]] for w in names}
    data = {TASK[w]: results["data"][TASK[w]] for w in names}
    record = _record(results, {"dev": dev, "setup_s": measured["tokenize_s"], "call_s": measured["call_s"],
                               "data_report": data, "model_dir": out, "peak_rss_gb": peak_rss_gb()})
    if compile_model:
        evals = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if r.get("kind") == "eval"]
        if len(evals) >= 2:
            first, last = evals[0], evals[-1]
            steady = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
            record.update(first_steps=first["step"], first_steps_s=first["elapsed_s"],
                          compile_overhead_s=first["elapsed_s"] - first["step"] * steady,
                          steady_step_s=steady, steady_examples_per_s=spec["settings"]["batch_size"] / steady,
                          note=f"torch.compile: first {first['step']} steps {first['elapsed_s']:.1f}s (compile "
                               f"~{first['elapsed_s'] - first['step'] * steady:.0f}s), then "
                               f"{spec['settings']['batch_size'] / steady:.1f} examples/s")
    return record


# -- inference --------------------------------------------------------------------------------------
def run_inference(spec: dict, model_dir: str) -> dict:
    """All three tasks for each item (a sentence for sentiment and NER, a pair for similarity) and sentiment
    alone, over the mixture's model. ``predict_all`` does one backbone pass per batch for every task."""
    import multitune

    items = read_jsonl(spec["data"]["inference"]["path"])
    texts = [r["text"] for r in items]
    pairs = [tuple(r["pair"]) for r in items]
    bs = spec["settings"]["inference_batch_size"]
    t0 = time.perf_counter()
    model = multitune.load(model_dir)
    load_s = time.perf_counter() - t0
    try:
        from multitune.inference import predict_all
    except ImportError:
        predict_all = None
    names = {w: TASK[w] for w in SINGLE}
    inputs = {"sst2": texts, "wnut17": texts, "stsb": pairs}
    # warm-up: the first batches of a process are slow
    for w, task in names.items():
        model.predict(task, inputs[w][:bs], batch_size=bs)
    if predict_all is not None:
        predict_all(model, [*texts[:bs], *pairs[:bs]], batch_size=bs)
    seconds = {}
    for w, task in names.items():  # each task on its own: three passes, as three pipelines do
        t = time.perf_counter()
        out = model.predict(task, inputs[w], batch_size=bs)
        seconds[w] = time.perf_counter() - t
        assert len(out) == len(items)
    record: dict[str, Any] = {"items": len(items), "load_s": load_s, "seconds": seconds,
                              "three_passes_s": sum(seconds.values()), "single_s": seconds["sst2"],
                              "single_texts_per_s": len(items) / seconds["sst2"], "precision": "fp32"}
    if predict_all is not None:
        t = time.perf_counter()
        out = predict_all(model, [*texts, *pairs], batch_size=bs)
        record["all_tasks_s"] = time.perf_counter() - t
        record["mode"] = "predict_all: one backbone pass per batch for every task"
        assert len(out) == 2 * len(items)
    else:
        record["all_tasks_s"] = record["three_passes_s"]
        record["mode"] = "fallback: 3 passes (multitune.inference.predict_all not found)"
    record["all_tasks_items_per_s"] = len(items) / record["all_tasks_s"]
    if predict_all is not None:  # cheaper precisions, with their agreement with the fp32 answers
        reference = out
        record["variants"] = {}
        for precision in ("bf16", "int8"):
            variant = multitune.load(model_dir, precision=precision)
            predict_all(variant, [*texts[:bs], *pairs[:bs]], batch_size=bs)  # warm-up
            t = time.perf_counter()
            answers = predict_all(variant, [*texts, *pairs], batch_size=bs)
            all_s = time.perf_counter() - t
            t = time.perf_counter()
            variant.predict(names["sst2"], texts, batch_size=bs)
            single_s = time.perf_counter() - t
            record["variants"][precision] = {
                "all_tasks_s": all_s, "all_tasks_items_per_s": len(items) / all_s, "single_s": single_s,
                "single_texts_per_s": len(items) / single_s, "agreement": _agreement(reference, answers, names)}
            del variant
    record["peak_rss_gb"] = peak_rss_gb()
    return record


def _agreement(reference: list[dict], answers: list[dict], names: dict[str, str]) -> dict[str, float]:
    """How far a cheaper precision's answers are from fp32's: the share of equal sentiment labels, the share
    of equal NER tags, and the Pearson correlation of the similarity scores."""
    import numpy as np

    labels = [(r[names["sst2"]]["label"], a[names["sst2"]]["label"]) for r, a in zip(reference, answers)
              if names["sst2"] in r]
    tags = [(x, y) for r, a in zip(reference, answers) if names["wnut17"] in r
            for x, y in zip(r[names["wnut17"]].get("tags", []), a[names["wnut17"]].get("tags", []))]
    scores = np.array([(r[names["stsb"]]["score"], a[names["stsb"]]["score"]) for r, a in zip(reference, answers)
                       if names["stsb"] in r], dtype=float)
    result = {"sentiment_label_agreement": sum(x == y for x, y in labels) / max(1, len(labels))}
    if tags:
        result["ner_tag_agreement"] = sum(x == y for x, y in tags) / len(tags)
    if len(scores) > 1:
        result["similarity_pearson_vs_fp32"] = float(np.corrcoef(scores[:, 0], scores[:, 1])[0, 1])
    return result


# -- scaling curves -----------------------------------------------------------------------------------
def run_scaling(spec: dict) -> dict:
    """Cost per example (1) as tasks of the same size are added and (2) as the data grows.

    (1) ``k`` copies of one SST-2 sample under different task names, ``steps_per_task * k`` steps in
    round robin: train seconds per example. (2) one SST-2 task of ``n`` examples for one epoch: seconds per
    example of tokenisation plus training, and of the whole ``train`` call.
    """
    sc = spec["scaling"]
    work = Path(spec["models_dir"]) / "scaling"
    work.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(spec["data"]["sst2"]["train"])
    dev = work / "dev.jsonl"
    write_jsonl(dev, read_jsonl(spec["data"]["sst2"]["validation"])[:sc["dev_rows"]])
    per_task = work / f"task-{sc['task_examples']}.jsonl"
    write_jsonl(per_task, rows[:sc["task_examples"]])
    # warm-up run, not recorded: the first steps of a process pay for kernel selection and allocations, which
    # would otherwise make whichever point comes first look expensive
    train(spec, {"warmup": task_section("sst2", str(per_task), str(dev))}, sc["steps_per_task"], str(work / "warmup"))
    shutil.rmtree(work / "warmup", ignore_errors=True)
    tasks_curve = []
    for k in sc["tasks"]:
        tasks = {f"sst2_{i}": task_section("sst2", str(per_task), str(dev)) for i in range(k)}
        results, measured = train(spec, tasks, sc["steps_per_task"] * k, str(work / f"tasks-{k}"))
        shutil.rmtree(work / f"tasks-{k}", ignore_errors=True)
        rec = _record(results, measured)
        rec.update(tasks=k, ms_per_example=1000 * rec["train_s"] / rec["examples"])
        tasks_curve.append(rec)
        print(f"scaling: {k} tasks: {rec['ms_per_example']:.2f} ms/example", file=sys.stderr)
    data_curve = []
    batch = spec["settings"]["batch_size"]
    for n in sc["data_sizes"]:
        path = work / f"data-{n}.jsonl"
        write_jsonl(path, rows[:n])
        results, measured = train(spec, {"sentiment": task_section("sst2", str(path), str(dev))},
                                  math.ceil(n / batch), str(work / f"data-{n}"))
        shutil.rmtree(work / f"data-{n}", ignore_errors=True)
        rec = _record(results, measured)
        tok = measured["tokenize_s"] or 0.0
        rec.update(n=n, ms_per_example=1000 * (tok + rec["train_s"]) / n,
                   ms_per_example_call=1000 * measured["call_s"] / n)
        data_curve.append(rec)
        print(f"scaling: {n} examples: {rec['ms_per_example']:.2f} ms/example", file=sys.stderr)
    return {"tasks": tasks_curve, "data": data_curve, "settings": sc, "peak_rss_gb": peak_rss_gb()}
