"""Request and response bodies of the HTTP API (they make its OpenAPI spec), and the one error body."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from multitune.errors import printable, shorten_message

MAX_MESSAGE_CHARS = 1000


class TextPair(BaseModel):
    """An input for a task trained on text pairs (or a single text, without ``text_pair``)."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="the text (the first text of a pair)")
    text_pair: str | None = Field(None, description="the second text, for tasks trained on pairs")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"inputs": ["Maria flew from Lisbon to Oslo ."], "tasks": ["sentiment", "ner"]},
        {"inputs": [{"text": "a man plays a guitar", "text_pair": "someone is playing a guitar"}]}]})
    inputs: list[str | TextPair] = Field(min_length=1, description="texts, or {text, text_pair} objects for "
                                                                   "pair tasks")
    tasks: list[str] | None = Field(None, min_length=1, description="tasks to predict (default: every task "
                                                                    "that takes the input's form)")


class PredictResponse(BaseModel):
    predictions: list[dict[str, Any]] = Field(description="per input, task name -> prediction")


class TaskInfo(BaseModel):
    name: str
    type: str = Field(description="task type, e.g. classification")
    input: str = Field(description="'text' (a single text) or 'pair' ({text, text_pair})")
    labels: list[str] | None = Field(None, description="the label set (tags for token classification)")
    generates: bool = Field(description="the task generates text (text2text)")


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]


class HealthResponse(BaseModel):
    status: str
    tasks: int
    queued_inputs: int


class ErrorResponse(BaseModel):
    error: str = Field(description="error kind: invalid_request, unknown_task, too_large, busy, overloaded, "
                                   "unauthorized, timeout, not_found, method_not_allowed, bad_request, non_finite, "
                                   "internal")
    message: str = Field(description="one line for a person")
    valid_tasks: list[str] | None = Field(None, description="unknown_task: the model's tasks")


def error_content(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    """``{"error": kind, "message": ...}``: the message on one line, control characters and lone surrogates
    escaped (it may echo a client's text), at most :data:`MAX_MESSAGE_CHARS` characters."""
    line = printable(shorten_message(" ".join(str(message).splitlines()), MAX_MESSAGE_CHARS))
    return {"error": kind, "message": line, **extra}


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    """The JSON error every endpoint and limit answers with (see :func:`error_content`)."""
    return JSONResponse(error_content(kind, message, **extra), status_code=status, headers=headers)


def error_bytes(kind: str, message: str) -> bytes:
    """The body of :func:`error_response` as bytes, for answers written below the ASGI app."""
    return json.dumps(error_content(kind, message), ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")
