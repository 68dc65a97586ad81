"""The HTTP connection below the app: a header timeout and a bound on open connections, on uvicorn's h11
protocol, and the uvicorn config that runs the app with them and with the keep-alive timeout.

uvicorn itself never closes a connection whose request line and headers arrive slowly (or not at all), and
its ``limit_concurrency`` answers 503 as plain text while the connection stays open. Here a connection gets
``header_timeout`` seconds to deliver its headers, counted from when it opens and from the first byte of each
later request on it; one that runs out is answered 408 (or closed silently when it sent nothing). A
connection beyond ``max_connections`` is answered 503 and closed at once. Both answers carry the server's
JSON error body, as is the 400 for bytes that are not HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import http
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from multitune.serving.metrics import ServerMetrics
from multitune.serving.schemas import error_bytes
from multitune.serving.settings import ServerSettings


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a connection bound (see the module docstring).

    uvicorn builds one per connection with its own arguments; the keyword-only ones come through
    :func:`functools.partial` (see :func:`uvicorn_config`).
    """

    def __init__(self, config: Any, server_state: Any, app_state: dict, _loop: Any = None, *,
                 header_timeout: float, max_connections: int, metrics: ServerMetrics | None = None):
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.metrics = metrics
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_started = False  # bytes of a request whose headers are not complete have arrived

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(503, "overloaded", f"too many open connections (--max-connections "
                                            f"{self.max_connections}); retry later", "too_many_connections")
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # the bytes of a new request (or more of its headers)
            self._request_started = True
            if self._header_timer is None:
                self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are complete: the app has the request
            self._disarm()
            self._request_started = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Bytes that are not HTTP, or headers over 16 KiB: the JSON error instead of uvicorn's plain text."""
        self._disarm()
        self._refuse(400, "bad_request", "not a valid HTTP/1.1 request (or its headers are over 16 KiB)",
                     "invalid_http")

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if not self._request_started:  # a connection that never sent a byte: nothing to answer
            self.transport.close()
            return
        self._refuse(408, "timeout", f"request headers not complete within {self.header_timeout:g} s "
                                     f"(--header-timeout)", "header_timeout")

    def _refuse(self, status: int, kind: str, message: str, reason: str) -> None:
        """Answer ``status`` with the JSON error body and close; the request (if any) is never read."""
        body = error_bytes(kind, message)
        head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()
        if self.metrics is not None:
            self.metrics.observe_refused(reason)


def uvicorn_config(app: Any, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "info", **kwargs: Any) -> uvicorn.Config:
    """The uvicorn config that serves ``app`` with the timeouts and connection bound of ``settings``.

    Args:
        app: the app of :func:`~multitune.serving.create_app` (its metrics also count refused connections).
        settings: ``header_timeout``, ``keep_alive_timeout`` and ``max_connections`` are used here.
        host, port, log_level: as for uvicorn.
        kwargs: further :class:`uvicorn.Config` arguments.
    """
    protocol = functools.partial(GuardedH11Protocol, header_timeout=settings.header_timeout,
                                 max_connections=settings.max_connections,
                                 metrics=getattr(app.state, "metrics", None))
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, http=protocol,
                          timeout_keep_alive=settings.keep_alive_timeout, server_header=False,
                          timeout_graceful_shutdown=10, **kwargs)
