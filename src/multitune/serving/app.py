"""The HTTP API: FastAPI app over one loaded model, and ``multitune serve``.

Endpoints: ``POST /v1/predict``, ``GET /v1/tasks``, ``GET /health``, ``GET /metrics``; the OpenAPI spec is at
``/openapi.json``. Every error is a JSON body ``{"error": KIND, "message": ONE_LINE}``; a server error is
logged on the server and answered with a generic message. What a request passes before the app (API key,
body limits and timeout) is in :mod:`multitune.serving.guard`; what a connection passes before that (header
timeout, connection bound) is in :mod:`multitune.serving.protocol`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitune.inference import (
    InputError,
    UnknownTaskError,
    input_form,
    normalize_input,
    predict_planned,
    resolve_tasks,
)
from multitune.model import load
from multitune.serving.batcher import BatchFailedError, MicroBatcher, QueueFullError
from multitune.serving.guard import OPEN_PATHS, ByteBudget, RequestGuard
from multitune.serving.inputs import TokenizerCheck, first_non_finite, not_utf8, too_long
from multitune.serving.metrics import ServerMetrics
from multitune.serving.protocol import uvicorn_config
from multitune.serving.schemas import (
    ErrorResponse,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    TaskInfo,
    TasksResponse,
    error_response,
)
from multitune.serving.settings import ServerSettings

logger = logging.getLogger("multitune.serving")

ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 408, 413, 422, 429, 500, 503)}
_STATUS_KINDS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
                 413: "too_large", 429: "busy", 503: "overloaded"}
_error = error_response


def _invalid_request(exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        position = first.get("loc", ("body", "?"))[-1]
        reason = (first.get("ctx") or {}).get("error", "invalid")
        return _error(422, "invalid_request", f"body: not valid JSON: {reason} (at character {position})")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return _error(422, "invalid_request", f"{where}: {first.get('msg')}" if where else str(first.get("msg")))


def _unreadable_body(exc: StarletteHTTPException):
    """FastAPI answers 400 when the body is JSON it cannot even decode: it is a 422 like any invalid JSON."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        reason = f"not UTF-8 (byte {cause.start})"
    elif isinstance(cause, RecursionError):
        reason = "nested too deeply"
    else:
        reason = type(cause).__name__ if cause is not None else str(exc.detail)
    return _error(422, "invalid_request", f"body: not valid JSON: {reason}")


def _add_bearer_security(app: FastAPI) -> None:
    """Declare the API key in the OpenAPI spec (``/health`` needs none), so that clients built from it send it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            spec.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
                "type": "http", "scheme": "bearer", "description": "the server's --api-key"}
            spec["security"] = [{"apiKey": []}]
            for path in OPEN_PATHS:
                for operation in spec["paths"].get(path, {}).values():
                    operation["security"] = []
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
        settings: batching, limits and the API key (default: :class:`ServerSettings` defaults).
        title: the API title in the OpenAPI spec.

    Returns:
        The app; run it with uvicorn, best with :func:`~multitune.serving.uvicorn_config` (which adds the header
        timeout and the connection bound). Its lifespan starts the micro-batcher.

    Raises:
        ConfigError: settings that do not fit together (see :meth:`ServerSettings.validate`).
    """
    settings = settings or ServerSettings()
    settings.validate()
    metrics = ServerMetrics()
    warm_up(model)
    check = TokenizerCheck(getattr(model, "tokenizer", None), getattr(model, "max_length", None))

    def run_model(inputs: list, plan: list) -> list:
        return predict_planned(model, inputs, plan, batch_size=settings.max_batch_size)

    batcher = MicroBatcher(run_model, settings.max_batch_size, settings.max_wait_ms, settings.max_queue,
                           metrics.observe_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        check.start()
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            check.stop()

    app = FastAPI(title=title, version="1", lifespan=lifespan,
                  description="Every task of one multi-task model, one backbone pass per batch.")
    budget = ByteBudget(settings.max_buffered_bytes)
    app.state.model, app.state.settings, app.state.metrics, app.state.batcher = model, settings, metrics, batcher
    app.state.budget, app.state.input_check = budget, check
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics, routes=app.router.routes, budget=budget)
    if settings.api_key is not None:
        _add_bearer_security(app)
    tasks_info = [TaskInfo(name=name, type=task.config.type, input=input_form(task),
                           labels=task.state().get("labels") or None, generates=not task.reads_token_states)
                  for name, task in model.tasks.items()]

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return _invalid_request(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:
            return _unreadable_body(exc)
        return _error(exc.status_code, _STATUS_KINDS.get(exc.status_code, "error"), str(exc.detail),
                      headers=exc.headers)

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Predict the requested tasks (default: all) for every input")
    async def predict(body: PredictRequest):
        if len(body.inputs) > settings.max_inputs:
            return _error(413, "too_large", f"{len(body.inputs)} inputs; at most {settings.max_inputs} per "
                                            f"request (--max-inputs)")
        try:
            inputs = [normalize_input(x if isinstance(x, str) else x.model_dump(), i)
                      for i, x in enumerate(body.inputs)]
            problem = too_long(inputs, settings.max_chars)
            if problem:
                return _error(413, "too_large", problem)
            plan = resolve_tasks(model, inputs, body.tasks)
        except UnknownTaskError as exc:
            return _error(404, "unknown_task", str(exc), valid_tasks=exc.valid)
        except InputError as exc:
            return _error(422, "invalid_request", str(exc))
        # checked here, so that an input the model cannot read never joins (and fails) a batch
        problem = not_utf8(inputs) or await check.first_error(inputs)
        if problem:
            return _error(422, "invalid_request", problem)
        try:
            predictions = await batcher.submit(inputs, plan)
        except QueueFullError as exc:
            return _error(429, "busy", f"server busy: {exc}; retry later")
        except BatchFailedError:  # logged once by the batcher, with its traceback
            return _error(500, "internal", "prediction failed (logged on the server)")
        for i, prediction in enumerate(predictions):
            where = first_non_finite(prediction)
            if where is not None:  # NaN and infinity are not JSON: the request fails, naming the input
                logger.warning("inputs[%d]: the prediction %s is not a finite number; answered 500", i, where)
                return _error(500, "non_finite", f"inputs[{i}]: the model's prediction {where} is not a finite "
                                                 f"number (NaN or infinity; logged on the server)")
        return {"predictions": predictions}

    @app.get("/v1/tasks", response_model=TasksResponse, responses=ERRORS,
             summary="The model's tasks, input forms and label sets")
    async def tasks():
        return {"tasks": tasks_info}

    @app.get("/health", response_model=HealthResponse,
             summary="Liveness: the model is loaded and serving (open even with an API key)")
    async def health():
        return {"status": "ok", "tasks": len(model.tasks), "queued_inputs": batcher.queued_inputs}

    @app.get("/metrics", summary="Request counts per endpoint and status, latency percentiles, batch sizes",
             responses={200: {"content": {"application/json": {}, "text/plain": {}}}, **ERRORS})
    async def get_metrics(format: str = Query("json", pattern="^(json|prometheus)$",
                                              description="json, or prometheus (text exposition format)")):
        if format == "prometheus":
            return PlainTextResponse(metrics.prometheus(batcher.queued_inputs, budget.used),
                                     media_type="text/plain; version=0.0.4")
        return metrics.snapshot(batcher.queued_inputs, budget.used)

    return app


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          log_level: str = "info") -> None:
    """Load a trained model and serve it until interrupted (``multitune serve``).

    Prints one warning line when ``host`` is not a loopback address and no API key is set.

    Raises:
        MultituneError: the directory is not a multitune model.
        ConfigError: settings that do not fit together.
    """
    settings = settings or ServerSettings()
    settings.validate()
    model = load(run_dir)
    app = create_app(model, settings, title=f"multitune: {Path(run_dir).resolve().name}")
    print(f"multitune: serving {', '.join(model.tasks)} from {run_dir} on http://{host}:{port} "
          f"(API docs: /docs, spec: /openapi.json{'; API key required' if settings.api_key else ''})",
          file=sys.stderr, flush=True)
    if settings.api_key is None and not is_loopback(host):
        print(f"multitune: warning: listening on {host} without an API key: anyone who can reach port {port} can "
              f"use the model (set MULTITUNE_API_KEY or --api-key)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn_config(app, settings, host, port, log_level))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it shut down on
        server.run()
