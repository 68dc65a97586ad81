"""Request counts and latency percentiles of the server, as JSON or Prometheus text."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

import numpy as np

WINDOW = 10_000  # latencies kept per endpoint for the percentiles: the recent ones
QUANTILES = (0.5, 0.95, 0.99)
#: methods counted under their own name; any other (a client may send any token) is counted as ``other``
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def endpoint_label(method: str, route: str | None) -> str:
    """``POST /v1/predict``; a method outside :data:`METHODS` becomes ``other``, and a path the app does not
    have is ``unmatched`` whatever its method: clients cannot grow the label set."""
    if route is None:
        return "unmatched"
    return f"{method if method in METHODS else 'other'} {route}"


class ServerMetrics:
    """Counts per (endpoint, status), latency percentiles per endpoint over the last :data:`WINDOW` requests
    (``total`` is over every request), model batch sizes, and connections refused below the app.

    Thread-safe. Endpoints are :func:`endpoint_label` values (method and route template), so the label set is
    bounded by the app's routes whatever clients send.
    """

    def __init__(self):
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self._latency: dict[str, deque[float]] = {}
        self._latency_sum: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self.batches = 0
        self.batch_inputs = 0
        self.batch_requests = 0
        self.largest_batch = 0

    def observe_request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """Count one answered request (``route``: its route template, None for a path the app lacks)."""
        endpoint = endpoint_label(method, route)
        with self._lock:
            self._counts[(endpoint, status)] += 1
            self._latency.setdefault(endpoint, deque(maxlen=WINDOW)).append(seconds * 1000)
            self._latency_sum[endpoint] += seconds

    def observe_refused(self, reason: str) -> None:
        """Count a connection closed before its request reached the app (``header_timeout``,
        ``too_many_connections``)."""
        with self._lock:
            self._refused[reason] += 1

    def observe_batch(self, requests: int, inputs: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_requests += requests
            self.batch_inputs += inputs
            self.largest_batch = max(self.largest_batch, inputs)

    def snapshot(self, queued_inputs: int = 0, buffered_bytes: int = 0) -> dict:
        """The JSON form of ``GET /metrics`` (``queued_inputs`` and ``buffered_bytes``: the gauges now)."""
        with self._lock:
            requests: dict[str, dict[str, int]] = {}
            for (endpoint, status), n in sorted(self._counts.items()):
                requests.setdefault(endpoint, {})[str(status)] = n
            latency = {}
            for endpoint, values in sorted(self._latency.items()):
                arr = np.fromiter(values, dtype=float)
                latency[endpoint] = {"window": len(arr), "total": round(self._latency_sum[endpoint] * 1000, 3),
                                     "mean": round(float(arr.mean()), 3),
                                     **{f"p{int(q * 100)}": round(float(np.quantile(arr, q)), 3)
                                        for q in QUANTILES}}
            return {"uptime_s": round(time.time() - self.started, 1), "requests": requests, "latency_ms": latency,
                    "batches": {"count": self.batches, "inputs": self.batch_inputs,
                                "requests": self.batch_requests, "largest": self.largest_batch,
                                "mean_inputs": round(self.batch_inputs / self.batches, 2) if self.batches else 0.0},
                    "refused_connections": dict(sorted(self._refused.items())), "queued_inputs": queued_inputs,
                    "buffered_bytes": buffered_bytes}

    def prometheus(self, queued_inputs: int = 0, buffered_bytes: int = 0) -> str:
        """The Prometheus text exposition form (``GET /metrics?format=prometheus``)."""
        snap = self.snapshot(queued_inputs, buffered_bytes)
        lines = ["# TYPE multitune_requests_total counter"]
        for endpoint, statuses in snap["requests"].items():
            for status, n in statuses.items():
                lines.append(f'multitune_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        lines.append("# TYPE multitune_request_latency_ms summary")
        for endpoint, stats in snap["latency_ms"].items():
            for q in QUANTILES:
                lines.append(f'multitune_request_latency_ms{{endpoint="{endpoint}",quantile="{q}"}} '
                             f'{stats[f"p{int(q * 100)}"]}')
            lines.append(f'multitune_request_latency_ms_sum{{endpoint="{endpoint}"}} {stats["total"]}')
            count = sum(snap["requests"].get(endpoint, {}).values())
            lines.append(f'multitune_request_latency_ms_count{{endpoint="{endpoint}"}} {count}')
        lines += ["# TYPE multitune_batches_total counter", f"multitune_batches_total {snap['batches']['count']}",
                  "# TYPE multitune_batch_inputs_total counter",
                  f"multitune_batch_inputs_total {snap['batches']['inputs']}",
                  "# TYPE multitune_queued_inputs gauge", f"multitune_queued_inputs {queued_inputs}",
                  "# TYPE multitune_buffered_bytes gauge", f"multitune_buffered_bytes {buffered_bytes}",
                  "# TYPE multitune_refused_connections_total counter"]
        for reason, n in snap["refused_connections"].items():
            lines.append(f'multitune_refused_connections_total{{reason="{reason}"}} {n}')
        return "\n".join(lines) + "\n"
