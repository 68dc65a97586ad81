"""Server throughput and latency: `multitune serve` on loopback, 1 / 4 / 16 concurrent clients, every task
in each request vs one task per request.

- all tasks: each request holds one review text and one sentence pair and names no task, so the text goes to
  every single-text task (quickstart: sentiment, NER) and the pair to every pair task (similarity): 3 task
  predictions per request.
- one task: each request holds one input and names one task, cycling through the tasks: 1 prediction.

Texts come from the quickstart's validation data. The server runs in its own process with its default
batching (max batch 32 inputs, 5 ms wait) and limits; clients are threads with keep-alive connections, each
sending its next request when the last one is answered.

Attack: normal clients (one task per request) measured quiet, then again while hostile clients are connected
(in a process of their own): 100 slow clients trickling their headers one byte per 0.5 s, and 300 clients
that each declare a 1 MB body, send all of it but 1,000 bytes and stall. Each reconnects when the server
closes it, so the pressure lasts the whole measurement. The server's RSS is sampled every 0.1 s: its peak in
each phase, and what is left 5 s after the attackers are gone.

Burst: 1,000 one-text requests from 16 clients as fast as they are answered, clean and with every tenth
request holding a lone surrogate (valid JSON, text that cannot be encoded): the wall time of each burst.

Writes bench/results/serving-<date>.json and .md.

    python bench/serving.py [RUN_DIR] [--clients 1 4 16] [--seconds 20] [--attack-only | --no-attack]

Run from the repository root after `multitune quickstart --output-dir runs/quickstart`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import itertools
import json
import multiprocessing
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


# -- burst with poisoned inputs ---------------------------------------------------------------------------------

BURST_REQUESTS, BURST_CLIENTS = 1000, 16


def _burst(url: str, poisoned_share: float, texts: list[str]) -> dict:
    """``BURST_REQUESTS`` one-text requests from ``BURST_CLIENTS`` clients as fast as they are answered; every
    ``1 / poisoned_share``-th holds a lone surrogate (valid JSON, not encodable text). Wall time of the burst."""
    import httpx

    every = round(1 / poisoned_share) if poisoned_share else 0
    bodies = []
    for i in range(BURST_REQUESTS):
        text = json.dumps(texts[i % len(texts)])[1:-1]
        if every and i % every == every - 1:
            text += "\\ud800"  # the JSON escape of a lone surrogate
        bodies.append(('{"inputs": ["' + text + '"], "tasks": ["sentiment"]}').encode())
    statuses: list[int] = []
    lock = threading.Lock()
    queue = iter(bodies)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"content-type": "application/json"}) as c:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                status = c.post("/v1/predict", content=body).status_code
                with lock:
                    statuses.append(status)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(BURST_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"poisoned_share": poisoned_share, "requests": len(statuses), "wall_s": round(wall, 2),
            "status_counts": {str(k): statuses.count(k) for k in sorted(set(statuses))}}


# -- attack: slow and stalled clients ---------------------------------------------------------------------------

SLOW_CLIENTS, STALLED_BODIES, BODY_BYTES = 100, 300, 1_000_000


def _rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _RssSampler(threading.Thread):
    """The server's RSS every 0.1 s, and the request-body bytes it holds (``/metrics``) every 0.5 s; ``peaks``
    and ``buffered`` keep the largest of each per phase (the phase set when the sample was taken)."""

    def __init__(self, pid: int, url: str):
        super().__init__(daemon=True)
        self.pid, self.url, self.phase, self.peaks, self.buffered = pid, url, "start", {}, {}
        self.done = threading.Event()

    def run(self) -> None:
        import httpx

        for tick in itertools.count():
            if self.done.wait(0.1):
                return
            phase = self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), _rss_mb(self.pid))
            if tick % 5 == 0:
                held = httpx.get(f"{self.url}/metrics", timeout=30).json()["buffered_bytes"]
                self.buffered[phase] = max(self.buffered.get(phase, 0), held)


async def _connect(port: int, stats: dict, counter: str) -> tuple | None:
    """A connection to the server (counted), or None after a pause when it refused one."""
    try:
        conn = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        await asyncio.sleep(1)
        return None
    stats[counter] += 1
    return conn


async def _slow_client(port: int, deadline: float, stats: dict) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4000
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        if (conn := await _connect(port, stats, "slow_connects")) is None:
            continue
        reader, writer = conn
        try:
            for byte in request:
                if loop.time() >= deadline:
                    break
                writer.write(bytes([byte]))
                try:  # anything from the server (its 408, or the end of the connection) ends this one
                    if await asyncio.wait_for(reader.read(4096), 0.5) or reader.at_eof():
                        stats["slow_cut"] += 1
                        break
                except asyncio.TimeoutError:
                    pass
        except OSError:
            stats["slow_cut"] += 1
        writer.close()
        await asyncio.sleep(0.1)


async def _stalled_client(port: int, deadline: float, stats: dict) -> None:
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {BODY_BYTES}\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        if (conn := await _connect(port, stats, "stalled_connects")) is None:
            continue
        reader, writer = conn
        try:
            writer.write(head)
            try:  # a server that refuses at once (no room for the body) answers before the body is sent
                answer = await asyncio.wait_for(reader.read(4096), 0.3)
            except asyncio.TimeoutError:
                writer.write(b" " * (BODY_BYTES - 1000))
                await asyncio.wait_for(writer.drain(), max(deadline - loop.time(), 0.1))
                stats["bodies_sent"] += 1
                answer = await asyncio.wait_for(reader.read(4096), max(deadline - loop.time(), 0.1))
            stats["stalled_answers"][answer[9:12].decode("ascii", "replace") or "closed"] += 1
        except asyncio.TimeoutError:  # still held by the server when the attack ended (before OSError: a subclass)
            stats["stalled_answers"]["held at the end"] += 1
        except OSError:  # refused while its body was on the way
            stats["stalled_answers"]["reset"] += 1
        writer.close()
        await asyncio.sleep(1)


def _attack(port: int, seconds: float, results) -> None:
    """The attackers, in a process of their own (their work must not slow the normal clients' threads)."""
    import collections

    async def run() -> dict:
        stats = collections.Counter()
        stats["stalled_answers"] = collections.Counter()
        deadline = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(_slow_client(port, deadline, stats) for _ in range(SLOW_CLIENTS)),
                             *(_stalled_client(port, deadline, stats) for _ in range(STALLED_BODIES)))
        return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in stats.items()}

    results.put(asyncio.run(run()))


def _attack_rows(url: str, pid: int, seconds: float, texts, pairs, tasks, clients: int = 4) -> dict:
    """Normal clients quiet, then under attack; the server's peak RSS in each phase and after."""
    import httpx

    port = int(url.rsplit(":", 1)[1])
    rss_start = round(_rss_mb(pid), 1)
    sampler = _RssSampler(pid, url)
    sampler.start()
    sampler.phase = "quiet"
    quiet = _cell(url, "one", clients, seconds, texts, pairs, tasks)
    results = multiprocessing.get_context("spawn").Queue()
    ramp = 5.0  # the attackers connect and send their bodies before the measurement starts
    attackers = multiprocessing.get_context("spawn").Process(target=_attack, args=(port, ramp + seconds + 2,
                                                                                  results))
    before = httpx.get(f"{url}/metrics").json()
    sampler.phase = "ramp"
    attackers.start()
    time.sleep(ramp)
    sampler.phase = "attack"
    attacked = _cell(url, "one", clients, seconds, texts, pairs, tasks)
    attack_stats = results.get(timeout=120)
    attackers.join(timeout=30)
    sampler.phase = "after"
    time.sleep(5)
    sampler.done.set()
    sampler.join()
    after = httpx.get(f"{url}/metrics").json()
    refused = {k: v - before["refused_connections"].get(k, 0) for k, v in after["refused_connections"].items()}
    statuses = {s: n - before["requests"].get("POST /v1/predict", {}).get(s, 0)
                for s, n in after["requests"].get("POST /v1/predict", {}).items() if s in ("408", "503")}
    rows = []
    for phase, cell in (("quiet", quiet), ("attack", attacked)):
        rows.append({"phase": phase, "clients": clients, "requests_per_s": cell["requests_per_s"],
                     "p50_ms": cell["p50_ms"], "p95_ms": cell["p95_ms"], "errors": cell["errors"],
                     "peak_rss_mb": round(sampler.peaks.get(phase, float("nan")), 1),
                     "peak_buffered_mb": round(sampler.buffered.get(phase, 0) / 1e6, 1)})
    return {"rows": rows, "rss_after_mb": round(_rss_mb(pid), 1), "rss_before_quiet_mb": rss_start,
            "attackers": attack_stats,
            "server_refused_connections": refused, "server_predict_408_503": statuses,
            "setup": f"{SLOW_CLIENTS} slow clients (headers, 1 byte per 0.5 s) and {STALLED_BODIES} stalled "
                     f"{BODY_BYTES:,}-byte bodies (all but 1,000 bytes sent), reconnecting when closed; "
                     f"{clients} normal clients, one task per request, {seconds:g} s per phase"}


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?", default="runs/quickstart")
    ap.add_argument("--data", default=None, help="quickstart data directory (default: RUN_DIR-data)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per cell")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--attack-only", action="store_true", help="only the quiet and attack rows")
    group.add_argument("--no-attack", action="store_true", help="only the throughput cells")
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
        cells, attack, burst = [], None, []
        for mode in ("all", "one") if not args.attack_only else ():
            for clients in args.clients:
                cell = _cell(url, mode, clients, args.seconds, texts, pairs, tasks)
                print(json.dumps(cell), flush=True)
                cells.append(cell)
        if not args.no_attack:
            attack = _attack_rows(url, server.pid, args.seconds, texts, pairs, tasks)
            print(json.dumps(attack), flush=True)
            burst = [_burst(url, share, texts) for share in (0.0, 0.1)]
            print(json.dumps(burst), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    date = datetime.date.today().isoformat()
    result = {"date": date, "run_dir": str(run_dir), "tasks": [t["name"] for t in tasks],
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": round(load, 2)},
              "server": "multitune serve defaults: max batch 32 inputs, max wait 5 ms", "cells": cells,
              "attack": attack, "burst": burst}
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
    if attack is not None:
        lines += ["", f"Attack: {attack['setup']}.", "",
                  "| phase | clients | requests/s | p50 ms | p95 ms | errors | server peak RSS MB | "
                  "peak body bytes held MB |", "|---|---|---|---|---|---|---|---|"]
        for r in attack["rows"]:
            lines.append(f"| {r['phase']} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | "
                         f"{r['p95_ms']} | {r['errors']} | {r['peak_rss_mb']} | {r['peak_buffered_mb']} |")
        lines += ["", f"Server RSS before the quiet phase: {attack['rss_before_quiet_mb']} MB; 5 s after the attackers "
                      f"left: {attack['rss_after_mb']} MB. Refused connections: "
                      f"{attack['server_refused_connections']}; predict answers 408/503: "
                      f"{attack['server_predict_408_503']}."]
    if burst:
        lines += ["", f"Burst: {BURST_REQUESTS} one-text requests from {BURST_CLIENTS} clients; poisoned ones hold a "
                      "lone surrogate (valid JSON, text that cannot be encoded).", "",
                  "| poisoned | wall s | answers |", "|---|---|---|"]
        lines += [f"| {b['poisoned_share']:.0%} | {b['wall_s']} | {b['status_counts']} |" for b in burst]
        lines.append(f"\nPoisoned burst / clean burst: {burst[1]['wall_s'] / burst[0]['wall_s']:.2f}x")
    (dest / f"serving-{date}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
