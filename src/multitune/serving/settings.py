"""The server's typed settings: micro-batching and input limits (``multitune serve`` flags)."""

from __future__ import annotations

from dataclasses import dataclass

from multitune.config.parse import field


@dataclass
class ServerSettings:
    """How ``multitune serve`` batches requests and which requests it refuses.

    Every field is a flag of ``multitune serve`` (``max_batch_size`` is ``--max-batch-size``).
    """

    max_batch_size: int = field(32, help="most inputs in one model batch (a larger request runs in several)",
                                min=1)
    max_wait_ms: float = field(5.0, help="how long the first request of a batch waits for others to join it",
                               min=0.0)
    max_inputs: int = field(64, help="most inputs in one request (more: 413)", min=1)
    max_chars: int = field(4000, help="most characters in one text of an input (more: 413)", min=1)
    max_body_bytes: int = field(1_000_000, help="largest request body in bytes (more: 413)", min=64)
    max_queue: int = field(4096, help="most inputs waiting for the model; a request beyond it gets 429", min=1)
