"""The run's log: every record goes to ``metrics.jsonl`` and to the trackers the config reports to.

One object so that the training loop writes each record once, and a tracker (TensorBoard, MLflow, ...)
sees exactly the lines of ``metrics.jsonl``, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from multitune.fileio import append_jsonl


class RunLog:
    """Appends records to ``path`` (JSON lines) and passes each to the sinks added with :meth:`add_sink`.

    Args:
        path: the run's ``metrics.jsonl``.
        enabled: False on every process but the main one (nothing is written or sent there).
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.sinks: list[Callable[[dict], None]] = []

    def add_sink(self, sink: Callable[[dict], None]) -> None:
        """Send every later record to ``sink`` as well (called with the record's dict)."""
        self.sinks.append(sink)

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        for sink in self.sinks:
            sink(record)

    def close(self) -> None:
        """Flush and close the sinks that can be closed."""
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
