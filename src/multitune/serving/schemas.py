"""Request and response bodies of the HTTP API (they make its OpenAPI spec)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    error: str = Field(description="error kind: invalid_request, unknown_task, too_large, busy, not_found, "
                                   "method_not_allowed, internal")
    message: str = Field(description="one line for a person")
    valid_tasks: list[str] | None = Field(None, description="unknown_task: the model's tasks")
