"""Server throughput and latency: `multitune serve` on loopback, 1 / 4 / 16 concurrent clients, every task
in each request vs one task per request.

- all tasks: each request holds one review text and one sentence pair and names no task, so the text goes to
  every single-text task (quickstart: sentiment, NER) and the pair to every pair task (similarity): 3 task
  predictions per request.
- one task: each request holds one input and names one task, cycling through the tasks: 1 prediction.

Texts come from the quickstart's validation data. The server runs in its own process with its default
batching (max batch 32 inputs, 5 ms wait); clients are threads with keep-alive connections, each sending
its next request when the last one is answered. Writes bench/results/serving-<date>.json and .md.

    python bench/serving.py [RUN_DIR] [--clients 1 4 16] [--seconds 20]

Run from the repository root after `multitune quickstart --output-dir runs/quickstart`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def _inputs(data_dir: Path) -> tuple[list[str], list[dict]]:
    with open(data_dir / "sentiment" / "validation.tsv", encoding="utf-8") as fh:
        texts = [row["sentence"] for row in csv.DictReader(fh, delimiter="\t")]
    with open(data_dir / "similarity" / "validation.csv", encoding="utf-8") as fh:
        pairs = [{"text": a, "text_pair": b} for a, b, _ in csv.reader(fh)]
    return texts, pairs


def _requests(mode: str, texts: list[str], pairs: list[dict], tasks: list[dict]):
    """An endless stream of request bodies for ``mode``, each with the number of task predictions it asks."""
    for i in itertools.count():
        text, pair = texts[i % len(texts)], pairs[i % len(pairs)]
        if mode == "all":
            yield {"inputs": [text, pair]}, len(tasks)
        else:
            task = tasks[i % len(tasks)]
            yield {"inputs": [pair if task["input"] == "pair" else text], "tasks": [task["name"]]}, 1


def _cell(url: str, mode: str, clients: int, seconds: float, texts, pairs, tasks) -> dict:
    import httpx

    before = httpx.get(f"{url}/metrics").json()["batches"]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    predictions = [0] * clients
    errors = [0] * clients
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        stream = _requests(mode, texts[k::clients], pairs[k::clients], tasks)
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                body, n = next(stream)
                t0 = time.perf_counter()
                r = c.post("/v1/predict", json=body)
                latencies[k].append(time.perf_counter() - t0)
                if r.status_code == 200:
                    predictions[k] += n
                else:
                    errors[k] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array([x for per in latencies for x in per]) * 1000
    after = httpx.get(f"{url}/metrics").json()["batches"]
    batches = after["count"] - before["count"]
    return {"mode": mode, "clients": clients, "seconds": round(wall, 1), "requests": int(lat.size),
            "errors": sum(errors), "requests_per_s": round(lat.size / wall, 2),
            "predictions_per_s": round(sum(predictions) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "model_batches": batches,
            "inputs_per_batch": round((after["inputs"] - before["inputs"]) / max(batches, 1), 2)}


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?", default="runs/quickstart")
    ap.add_argument("--data", default=None, help="quickstart data directory (default: RUN_DIR-data)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per cell")
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    texts, pairs = _inputs(Path(args.data) if args.data else run_dir.parent / f"{run_dir.name}-data")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "multitune.cli", "serve", str(run_dir), "--port", str(port),
                               "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        tasks = httpx.get(f"{url}/v1/tasks").json()["tasks"]
        _cell(url, "all", 2, 3, texts, pairs, tasks)  # warm-up
        load = os.getloadavg()[0]
        cells = []
        for mode in ("all", "one"):
            for clients in args.clients:
                cell = _cell(url, mode, clients, args.seconds, texts, pairs, tasks)
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    finally:
        server.terminate()
        server.wait(timeout=30)
    date = datetime.date.today().isoformat()
    result = {"date": date, "run_dir": str(run_dir), "tasks": [t["name"] for t in tasks],
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": round(load, 2)},
              "server": "multitune serve defaults: max batch 32 inputs, max wait 5 ms", "cells": cells}
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"serving-{date}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Serving throughput and latency ({date})", "",
             f"`multitune serve {run_dir.name}` on 127.0.0.1, {os.cpu_count()} CPU cores shared with the clients "
             f"(load average {load:.1f} at the start). all = one text + one pair per request, every task "
             f"({len(tasks)} predictions); one = one input and one task per request.", "",
             "| tasks per request | clients | requests/s | predictions/s | p50 ms | p95 ms | inputs per model batch |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['mode']} | {c['clients']} | {c['requests_per_s']} | {c['predictions_per_s']} | "
                     f"{c['p50_ms']} | {c['p95_ms']} | {c['inputs_per_batch']} |")
    (dest / f"serving-{date}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
