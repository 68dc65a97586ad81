"""What every HTTP request passes before the app sees it: the API key, the body limits and the body timeout.

:class:`RequestGuard` is the outermost ASGI middleware. In order, it

1. answers 401 when an API key is set and the request does not carry it (``/health`` stays open);
2. answers 413 when the declared ``Content-Length`` is over ``max_body_bytes``;
3. reads the whole body within ``body_timeout`` seconds (else 408), counting its bytes against a
   :class:`ByteBudget` shared by all requests (a body that does not fit: 503), and over ``max_body_bytes``
   (413);
4. runs the app on the buffered body, turning an unexpected exception into a JSON 500 (its traceback goes to
   the server log only);
5. records the status and latency of every request in :class:`~multitune.serving.metrics.ServerMetrics`.

An answer given before the body was read to its end closes the connection, so that a client cannot keep it
open by trickling the rest of a refused body.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

from starlette.routing import Match

from multitune.serving.metrics import ServerMetrics
from multitune.serving.schemas import error_response
from multitune.serving.settings import ServerSettings

logger = logging.getLogger("multitune.serving")

#: a body at most this large may use the last part of the byte budget, which larger bodies leave free: a
#: flood of large bodies then still leaves room for ordinary requests
SMALL_BODY_BYTES = 64 * 1024
OPEN_PATHS = frozenset({"/health"})


class ByteBudget:
    """Bytes of request bodies held in memory at once, over every request of the server.

    A body over :data:`SMALL_BODY_BYTES` may fill the budget only up to 7/8 of ``limit``; the last 1/8 is
    kept for small bodies. Used from the event loop only (no lock).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.reserve = limit // 8
        self.used = 0

    def room(self, body_bytes: int) -> int:
        """Bytes a body that will hold ``body_bytes`` in all may still take."""
        return self.limit - self.used - (0 if body_bytes <= SMALL_BODY_BYTES else self.reserve)

    def take(self, n: int, body_bytes: int) -> bool:
        """Take ``n`` more bytes for a body that then holds ``body_bytes``; False when they do not fit."""
        if n > self.room(body_bytes):
            return False
        self.used += n
        return True

    def give_back(self, n: int) -> None:
        self.used -= n


class _Refused(Exception):
    """The body was not accepted; ``response`` answers it (None: the client went away, nothing to answer)."""

    def __init__(self, response: Any):
        self.response = response


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


def _has_body(scope: dict) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != b"0")


class RequestGuard:
    """The outermost ASGI middleware of the app (see the module docstring).

    Args:
        app: the ASGI app it guards.
        settings: the limits (``api_key``, ``max_body_bytes``, ``body_timeout``, ``max_buffered_bytes``).
        metrics: where each request's status and latency go.
        routes: the app's routes, to name the endpoint of a request refused before routing (a 401).
        budget: the byte budget of the bodies (default: a new one of ``settings.max_buffered_bytes``).
    """

    def __init__(self, app: Any, settings: ServerSettings, metrics: ServerMetrics, routes: list,
                 budget: ByteBudget | None = None):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.routes = routes
        self.budget = budget or ByteBudget(settings.max_buffered_bytes)
        # keys are compared as digests: equal lengths, and compare_digest takes the same time for any key
        self._key_digest = None if settings.api_key is None else hashlib.sha256(settings.api_key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]  # what a crash that never started a response counts as
        started = [False]
        body_read = [not _has_body(scope)]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
                if not body_read[0]:  # the rest of the body would keep the connection busy: close it
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        held = [0]
        try:
            refusal = self._check_key(scope)
            if refusal is not None:
                await refusal(scope, receive, send_status)
                return
            try:
                body = await self._read_body(scope, receive, held)
            except _Refused as refused:
                if refused.response is None:
                    status[0] = 499  # the client closed the connection before its body was in
                else:
                    await refused.response(scope, receive, send_status)
                return
            body_read[0] = True
            delivered = [False]

            async def replay():
                if not delivered[0]:
                    delivered[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            try:
                await self.app(scope, replay, send_status)
            except Exception:
                # logged here with its traceback; the client gets one generic line, and the connection lives on
                logger.exception("internal error on %s %s", scope["method"], scope["path"])
                if started[0]:
                    raise
                await error_response(500, "internal", "internal server error (logged on the server)")(
                    scope, replay, send_status)
        finally:
            self.budget.give_back(held[0])
            self.metrics.observe_request(scope["method"], self._route(scope), status[0], time.perf_counter() - start)

    def _check_key(self, scope: dict) -> Any:
        """None when the request may pass, else the 401 answer."""
        if self._key_digest is None or scope["path"] in OPEN_PATHS:
            return None
        header = _header(scope, b"authorization")
        challenge = 'Bearer realm="multitune"'
        if header is None:
            return error_response(401, "unauthorized", "this server needs an API key: send the header "
                                  "'Authorization: Bearer KEY'", headers={"WWW-Authenticate": challenge})
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                               self._key_digest):
            return None
        return error_response(401, "unauthorized", "wrong API key, or not sent as 'Authorization: Bearer KEY'",
                              headers={"WWW-Authenticate": f'{challenge}, error="invalid_token"'})

    async def _read_body(self, scope: dict, receive, held: list[int]) -> bytes:
        """The whole body; its bytes are added to ``held[0]`` as they are taken from the budget.

        Raises:
            _Refused: with the 408 / 413 / 503 answer, or None when the client disconnected.
        """
        limit = self.settings.max_body_bytes
        too_large = f"request body over {limit} bytes (--max-body-bytes)"
        length = _header(scope, b"content-length")
        declared = 0
        if length is not None:
            if not length.strip().isdigit() or int(length) > limit:
                raise _Refused(error_response(413, "too_large", too_large))
            declared = int(length)
        if declared > self.budget.room(declared):
            raise _Refused(self._overloaded())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise _Refused(error_response(408, "timeout", f"request body not complete within "
                                                              f"{self.settings.body_timeout:g} s (--body-timeout)")) from None
            if message["type"] != "http.request":
                raise _Refused(None)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Refused(error_response(413, "too_large", too_large))
            if not self.budget.take(len(chunk), max(size, declared)):
                raise _Refused(self._overloaded())
            held[0] += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _overloaded(self) -> Any:
        return error_response(503, "overloaded", f"the server holds too many request bodies at once "
                                                 f"(--max-buffered-bytes {self.settings.max_buffered_bytes}); "
                                                 f"retry later", headers={"Retry-After": "1"})

    def _route(self, scope: dict) -> str | None:
        """The route template of the request (``/v1/predict``), or None for a path the app does not have."""
        route = scope.get("route")
        if route is None:  # refused before routing
            for candidate in self.routes:
                match, _ = candidate.matches(scope)
                if match is not Match.NONE:
                    route = candidate
                    break
        return getattr(route, "path", None)
