"""A run's tasks with their data: built from the config, read, checked and tokenised once, for training and for
evaluating a finished run alike (so a carved-out split is the same in both)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitune.config.schema import RunConfig
from multitune.data import TaskData, load_task_data
from multitune.tasks.base import TASKS, Task


@dataclass
class PreparedTask:
    """A task with its data read, checked and tokenised once for the whole run."""

    task: Task
    data: TaskData
    features: dict[str, list[dict]] = field(default_factory=dict)


def build_tasks(config: RunConfig) -> dict[str, Task]:
    return {name: TASKS.get(cfg.type, f"tasks.{name}.type")(name, cfg) for name, cfg in config.tasks.items()}


def read_task_data(config: RunConfig, tasks: dict[str, Task]) -> dict[str, PreparedTask]:
    """Read, clean, split and check every task's data (no model needed; fails fast on bad input)."""
    prepared = {}
    for i, (name, task) in enumerate(tasks.items()):
        data = load_task_data(name, config.tasks[name].data, Path.cwd(), config.seed + 7919 * i,
                              task.fields, task.required, task.stratify_key, task_names=list(tasks))
        names = data.label_names.get(task.label_field) if task.label_field else None
        if names and not getattr(task, "labels", None):  # a datasets ClassLabel: keep the dataset's label order
            task.labels = list(names)
        task.setup(data.splits["train"])
        for examples in data.splits.values():
            task.check_examples(examples)
        prepared[name] = PreparedTask(task, data)
    return prepared


def tokenize_all(prepared: dict[str, PreparedTask], tokenizer: Any, max_length: int) -> None:
    for p in prepared.values():
        for split, examples in p.data.splits.items():
            features = p.task.encode(examples, tokenizer, max_length)
            p.features[split] = p.task.training_features(features) if split == "train" else features
