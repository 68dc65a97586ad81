"""The HTTP API: FastAPI app over one loaded model, and ``multitune serve``.

Endpoints: ``POST /v1/predict``, ``GET /v1/tasks``, ``GET /health``, ``GET /metrics``; the OpenAPI spec is at
``/openapi.json``. Every error is a JSON body ``{"error": KIND, "message": ONE_LINE}``; a server error is
logged with its traceback on the server and answered with a generic message.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitune.inference import (
    InputError,
    UnknownTaskError,
    input_form,
    normalize_input,
    predict_planned,
    resolve_tasks,
)
from multitune.serving.batcher import MicroBatcher, QueueFullError
from multitune.serving.metrics import ServerMetrics
from multitune.serving.schemas import (
    ErrorResponse,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    TaskInfo,
    TasksResponse,
)
from multitune.serving.settings import ServerSettings

logger = logging.getLogger("multitune.serving")

ERRORS = {code: {"model": ErrorResponse} for code in (404, 413, 422, 429)}
_STATUS_KINDS = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 429: "busy"}


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "message": " ".join(message.splitlines()), **extra}, status_code=status)


class _GuardMiddleware:
    """Refuses bodies over ``max_body_bytes`` (413) before the app reads them, turns an unexpected exception
    into a JSON 500 (its traceback goes to the server log only), and records every request's status and
    latency under its route template."""

    def __init__(self, app: Any, max_body_bytes: int, metrics: ServerMetrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]  # what a crash that never started a response counts as
        started = [False]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await _error(413, "too_large", f"request body over {self.max_body_bytes} bytes "
                                               f"(--max-body-bytes)")(scope, receive, send_status)
                return
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
                await _error(500, "internal", "internal server error (logged on the server)")(
                    scope, replay, send_status)
        finally:
            route = scope.get("route")
            endpoint = f"{scope['method']} {route.path}" if route is not None else "unmatched"
            self.metrics.observe_request(endpoint, status[0], time.perf_counter() - start)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is larger than the limit (by its header or by what arrives)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _too_long(inputs: list, limit: int) -> str | None:
    """The first text longer than ``limit`` characters, as an error message, or None."""
    for i, x in enumerate(inputs):
        texts = {"": x} if isinstance(x, str) else {".text": x["text"], ".text_pair": x.get("text_pair")}
        for suffix, value in texts.items():
            if value is not None and len(value) > limit:
                return f"inputs[{i}]{suffix}: {len(value)} characters; at most {limit} (--max-chars)"
    return None


def warm_up(model: Any) -> None:
    """Predict one input for every task, in the calling thread.

    The first requests then do not pay for lazy initialisation. It also matters which thread runs torch's
    first parallel operation: when the model thread was the first, every CPU forward pass there took
    about 40 times longer (1 s instead of 25 ms for one MiniLM input, torch 2.13). So call this from the
    main thread, as :func:`create_app` does.
    """
    inputs = [("warm up", "warm up") if input_form(t) == "pair" else ("warm up", None) for t in model.tasks.values()]
    predict_planned(model, inputs, [[name] for name in model.tasks])


def create_app(model: Any, settings: ServerSettings | None = None, title: str = "multitune") -> FastAPI:
    """The FastAPI app serving every task of ``model`` (it predicts once per task first: :func:`warm_up`).

    Args:
        model: a loaded :class:`~multitune.model.MultiTaskModel`; only the app's model thread uses it.
        settings: batching and limits (default: :class:`ServerSettings` defaults).
        title: the API title in the OpenAPI spec.

    Returns:
        The app; run it with uvicorn (its lifespan starts the micro-batcher).
    """
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    warm_up(model)

    def run_model(inputs: list, plan: list) -> list:
        return predict_planned(model, inputs, plan, batch_size=settings.max_batch_size)

    batcher = MicroBatcher(run_model, settings.max_batch_size, settings.max_wait_ms, settings.max_queue,
                           metrics.observe_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title=title, version="1", lifespan=lifespan,
                  description="Every task of one multi-task model, one backbone pass per batch.")
    app.state.model, app.state.settings, app.state.metrics, app.state.batcher = model, settings, metrics, batcher
    app.add_middleware(_GuardMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    tasks_info = [TaskInfo(name=name, type=task.config.type, input=input_form(task),
                           labels=task.state().get("labels") or None, generates=not task.reads_token_states)
                  for name, task in model.tasks.items()]

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid_request", f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, _STATUS_KINDS.get(exc.status_code, "error"), str(exc.detail))

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Predict the requested tasks (default: all) for every input")
    async def predict(body: PredictRequest):
        if len(body.inputs) > settings.max_inputs:
            return _error(413, "too_large", f"{len(body.inputs)} inputs; at most {settings.max_inputs} per "
                                            f"request (--max-inputs)")
        raw = [x if isinstance(x, str) else x.model_dump() for x in body.inputs]
        too_long = _too_long(raw, settings.max_chars)
        if too_long:
            return _error(413, "too_large", too_long)
        try:
            inputs = [normalize_input(x, i) for i, x in enumerate(raw)]
            plan = resolve_tasks(model, inputs, body.tasks)
        except UnknownTaskError as exc:
            return _error(404, "unknown_task", str(exc), valid_tasks=exc.valid)
        except InputError as exc:
            return _error(422, "invalid_request", str(exc))
        try:
            predictions = await batcher.submit(inputs, plan)
        except QueueFullError as exc:
            return _error(429, "busy", f"server busy: {exc}; retry later")
        return {"predictions": predictions}

    @app.get("/v1/tasks", response_model=TasksResponse, summary="The model's tasks, input forms and label sets")
    async def tasks():
        return {"tasks": tasks_info}

    @app.get("/health", response_model=HealthResponse, summary="Liveness: the model is loaded and serving")
    async def health():
        return {"status": "ok", "tasks": len(model.tasks), "queued_inputs": batcher.queued_inputs}

    @app.get("/metrics", summary="Request counts per endpoint and status, latency percentiles, batch sizes",
             responses={200: {"content": {"application/json": {}, "text/plain": {}}}})
    async def get_metrics(format: str = Query("json", pattern="^(json|prometheus)$",
                                              description="json, or prometheus (text exposition format)")):
        if format == "prometheus":
            return PlainTextResponse(metrics.prometheus(batcher.queued_inputs),
                                     media_type="text/plain; version=0.0.4")
        return metrics.snapshot(batcher.queued_inputs)

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          log_level: str = "info") -> None:
    """Load a trained model and serve it until interrupted (``multitune serve``).

    Raises:
        MultituneError: the directory is not a multitune model.
    """
    import uvicorn

    from multitune.model import load

    model = load(run_dir)
    app = create_app(model, settings, title=f"multitune: {Path(run_dir).resolve().name}")
    print(f"multitune: serving {', '.join(model.tasks)} from {run_dir} on http://{host}:{port} "
          f"(API docs: /docs, spec: /openapi.json)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
