"""Task types. Importing this package registers every built-in type in :data:`TASKS`."""

from multitune.tasks import (  # noqa: F401
    chat,
    classification,
    masked_lm,
    regression,
    text2text,
    token_classification,
)
from multitune.tasks.base import TASKS, Task, TaskOutput

__all__ = ["TASKS", "Task", "TaskOutput"]
