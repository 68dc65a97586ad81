"""All-task inference on PyTorch fp32, PyTorch bf16 and onnxruntime fp32 (the exported ONNX graph), on the
same items: items/s, latency per batch, and agreement with PyTorch fp32.

Items: 1,000 single texts (SST-2 dev sentences, then WNUT-17 dev sentences) and 1,000 sentence pairs (STS-B
dev), from ../shared/data. Each item goes to every task of the model that takes its form (the quickstart
model: a text to sentiment and NER, a pair to similarity), as ``multitune serve`` does without a task list.
Items are sorted by length and cut into batches of 32; each batch is one mixed-task call
(``predict_mixed``: one backbone pass, or one graph run, for every task). Latency is the wall time of one
such call.

Agreement with PyTorch fp32, per task: the share of equal labels (classification), of equal tags and of
equal entity lists (token classification), the largest score difference (regression); and for onnxruntime
the largest difference of the raw outputs (logits, scores) on the first 256 items of each task.

Without RUN_DIR the quickstart model is trained first (quickstart data and config, ``--steps`` steps, into
``--out``; reused when it exists). Writes bench/results/onnx-<date>.json and .md.

    python bench/onnx_inference.py [RUN_DIR] [--items 2000] [--batch-size 32] [--steps 150] [--out runs/bench-onnx]

Run from the repository root with ../shared/data beside it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _items(n: int) -> list[tuple[str, str | None]]:
    """``n`` items: half single texts, half (text, text_pair) pairs, from the shared dev sets."""
    with open(DATA / "sst2" / "dev.tsv", encoding="utf-8", newline="") as fh:
        texts = [row["content"] for row in csv.DictReader(fh, delimiter="\t")]
    sentence: list[str] = []
    for line in (DATA / "wnut17" / "dev.conll").read_text(encoding="utf-8").splitlines():
        if line.strip():
            sentence.append(line.split("\t")[0])
        elif sentence:
            texts.append(" ".join(sentence))
            sentence = []
    with open(DATA / "stsb" / "dev.csv", encoding="utf-8", newline="") as fh:
        pairs = [(a, b) for a, b, _ in csv.reader(fh)]
    half = n // 2
    if len(texts) < n - half or len(pairs) < half:
        raise SystemExit(f"--items {n}: the dev sets hold {len(texts)} texts and {len(pairs)} pairs")
    return [(t, None) for t in texts[:n - half]] + [(a, b) for a, b in pairs[:half]]


def _train(out: Path, steps: int) -> Path:
    """The quickstart model (its data and config), trained for ``steps`` steps into ``out/run``."""
    from multitune.config.loader import parse_config
    from multitune.quickstart.data import write_quickstart_data
    from multitune.quickstart.run import quickstart_config
    from multitune.training import train

    run = out / "run"
    if (run / "model").is_dir():
        print(f"reusing {run}", file=sys.stderr)
        return run
    data = write_quickstart_data(out / "run-data")
    train(parse_config(quickstart_config(data, run, steps)), overwrite=True, progress=False)
    return run


def _plan(model: Any, items: list[tuple[str, str | None]], batch_size: int) -> list[list[tuple[int, str]]]:
    """Batches of ``(item index, task)`` requests: items in length order, ``batch_size`` items per batch, each
    item to every task that takes its form."""
    from multitune.inference import resolve_tasks

    plan = resolve_tasks(model, items)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1] or ""))
    return [[(i, task) for i in order[s:s + batch_size] for task in plan[i]]
            for s in range(0, len(order), batch_size)]


def _measure(model: Any, items: list[tuple[str, str | None]], batches: list[list[tuple[int, str]]]) -> dict:
    """Run every batch once (after one warm-up batch); predictions per (item, task) and the timings."""
    def requests(batch):
        return [(task, items[i][0] if items[i][1] is None else items[i]) for i, task in batch]

    model.predict_mixed(requests(batches[0]))  # warm-up: the first call of a process pays for lazy setup
    answers: dict[tuple[int, str], Any] = {}
    latencies = []
    start = time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        preds = model.predict_mixed(requests(batch))
        latencies.append(time.perf_counter() - t)
        answers.update(zip(batch, preds))
    total = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"seconds": round(total, 2), "items_per_s": round(len(items) / total, 1),
            "predictions_per_s": round(len(answers) / total, 1),
            "p50_ms_per_batch": round(float(np.percentile(ms, 50)), 1),
            "p95_ms_per_batch": round(float(np.percentile(ms, 95)), 1), "answers": answers}


def _agreement(reference: dict, answers: dict, model: Any) -> dict[str, dict]:
    """Per task: how often ``answers`` equal the fp32 PyTorch ``reference`` (see the module docstring)."""
    result: dict[str, dict] = {}
    for name in model.tasks:
        keys = [k for k in reference if k[1] == name]
        if not keys:
            continue
        ref, got = [reference[k] for k in keys], [answers[k] for k in keys]
        row: dict[str, Any] = {"predictions": len(keys)}
        if "label" in ref[0]:
            row["label_agreement"] = round(sum(r["label"] == g["label"] for r, g in zip(ref, got)) / len(keys), 4)
        if "labels" in ref[0]:
            row["labels_agreement"] = round(sum(r["labels"] == g["labels"] for r, g in zip(ref, got)) / len(keys), 4)
        if "tags" in ref[0]:
            pairs = [(x, y) for r, g in zip(ref, got) for x, y in zip(r["tags"], g["tags"])]
            row["tag_agreement"] = round(sum(x == y for x, y in pairs) / max(1, len(pairs)), 4)
            spans = [[(e["type"], e["start_token"], e["end_token"]) for e in p["entities"]] for p in (*ref, *got)]
            row["entity_list_agreement"] = round(sum(a == b for a, b in zip(spans[:len(ref)], spans[len(ref):]))
                                                 / len(keys), 4)
        if "score" in ref[0]:
            diff = [abs(r["score"] - g["score"]) for r, g in zip(ref, got)]
            row["max_score_diff"] = float(f"{max(diff):.3g}")
            row["mean_score_diff"] = float(f"{sum(diff) / len(diff):.3g}")
        result[name] = row
    return result


def _raw_output_diff(torch_model: Any, onnx_model: Any, items: list, n: int = 256) -> dict[str, float]:
    """Largest |PyTorch - onnxruntime| of each graph task's raw outputs on its first ``n`` items, batches of 32."""
    import torch

    result = {}
    for name, task in onnx_model.tasks.items():
        entry = onnx_model.meta["tasks"][name]
        if entry["computed"] != "graph":
            continue
        chosen = [x if x[1] is not None else x[0] for x in items if (x[1] is not None) == task.pair_input][:n]
        examples = [task.example_from_input(x) for x in chosen]
        feats = task.encode(examples, torch_model.tokenizer, torch_model.max_length)
        worst = 0.0
        for s in range(0, len(feats), 32):
            batch = task.collate(feats[s:s + 32], torch_model.tokenizer.pad_token_id or 0)
            with torch.inference_mode():
                want = torch_model.infer(name, batch).outputs
            got = onnx_model.run({k: v.numpy() for k, v in batch.items()}, list(entry["outputs"].values()))
            for key, graph_name in entry["outputs"].items():
                worst = max(worst, float(np.abs(got[graph_name] - want[key].numpy()).max()))
        result[name] = float(f"{worst:.3g}")
    emb_t = torch_model.embed_texts([x[0] for x in items[:n]], batch_size=32)
    emb_o = onnx_model.embed_texts([x[0] for x in items[:n]], batch_size=32)
    result["sentence_embedding"] = float(f"{float((emb_t - emb_o).abs().max()):.3g}")
    return result


def main() -> None:
    import torch

    import multitune
    from multitune.onnx import OnnxMultiTaskModel, export_onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?", default=None, help="a trained run (default: train the quickstart model)")
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=150, help="training steps when no RUN_DIR is given")
    ap.add_argument("--out", default="runs/bench-onnx", help="where the trained run and the ONNX export go")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    run = Path(args.run_dir).resolve() if args.run_dir else _train(out, args.steps)
    items = _items(args.items)
    load_start = os.getloadavg()[0]

    t = time.perf_counter()
    fp32 = multitune.load(run)
    load_s = {"pytorch": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    report = export_onnx(fp32, out / "onnx", overwrite=True)
    export_s = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    ort_model = OnnxMultiTaskModel.load(out / "onnx", device="cpu")
    load_s["onnxruntime"] = round(time.perf_counter() - t, 2)
    bf16 = multitune.load(run)
    bf16.set_inference_precision("bf16")

    batches = _plan(fp32, items, args.batch_size)
    systems = {"pytorch-fp32": fp32, "pytorch-bf16": bf16, "onnxruntime-fp32": ort_model}
    rows: dict[str, dict] = {}
    for label, model in systems.items():
        rows[label] = _measure(model, items, batches)
        print(label, json.dumps({k: v for k, v in rows[label].items() if k != "answers"}), flush=True)
    reference = rows["pytorch-fp32"]["answers"]
    for label in systems:
        rows[label]["agreement_with_pytorch_fp32"] = _agreement(reference, rows[label].pop("answers"), fp32)
    raw_diff = _raw_output_diff(fp32, ort_model, items)

    date = datetime.date.today().isoformat()
    result = {
        "date": date, "run_dir": str(run), "items": len(items), "batch_size": args.batch_size,
        "batches": len(batches), "trained_steps": None if args.run_dir else args.steps,
        "tasks": list(fp32.tasks), "graph_tasks": report["tasks"],
        "predictions": sum(len(b) for b in batches),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "onnxruntime": __import__("onnxruntime").__version__,
                    "load_average_at_start": round(load_start, 2),
                    "load_average_at_end": round(os.getloadavg()[0], 2)},
        "export_s": export_s, "onnx_bytes": report["bytes"], "load_s": load_s, "systems": rows,
        "onnxruntime_max_abs_output_diff": raw_diff}
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"onnx-{date}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    markdown = _markdown(result)
    (dest / f"onnx-{date}.md").write_text(markdown, encoding="utf-8")
    print(markdown)


def _markdown(result: dict) -> str:
    """The results page of one run (``result`` as written to the JSON file)."""
    run = Path(result["run_dir"])
    shown = run.relative_to(Path.cwd()) if run.is_relative_to(Path.cwd()) else run
    machine = result["machine"]
    lines = [f"# All-task inference: PyTorch fp32, PyTorch bf16, onnxruntime fp32 ({result['date']})", "",
             f"Model: `{shown}` ({', '.join(result['tasks'])}); {result['items']} items (half texts, half pairs), "
             f"{result['predictions']} task predictions, {result['batches']} mixed-task batches of "
             f"{result['batch_size']} items. {machine['cpus']} CPU cores, load average "
             f"{machine['load_average_at_start']:.1f} at the start and {machine['load_average_at_end']:.1f} at the "
             f"end (a shared machine: compare the rows, not the absolute numbers). Export took "
             f"{result['export_s']} s; the ONNX directory is {result['onnx_bytes'] / 1e6:.1f} MB with the tokenizer.",
             "",
             "| system | items/s | predictions/s | p50 ms per batch | p95 ms per batch | agreement with PyTorch fp32 |",
             "|---|---|---|---|---|---|"]
    for label, row in result["systems"].items():
        agree = "; ".join(f"{task}: " + ", ".join(f"{k} {v}" for k, v in a.items() if k != "predictions")
                          for task, a in row["agreement_with_pytorch_fp32"].items())
        lines.append(f"| {label} | {row['items_per_s']} | {row['predictions_per_s']} | {row['p50_ms_per_batch']} | "
                     f"{row['p95_ms_per_batch']} | {agree} |")
    lines += ["", "Largest |PyTorch fp32 - onnxruntime| of the raw outputs (first 256 items of each task): "
              + ", ".join(f"{k} {v}" for k, v in result["onnxruntime_max_abs_output_diff"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
