"""Task types. Importing this package registers every built-in type in :data:`TASKS`."""

from multitune.tasks import classification, masked_lm, regression, text2text, token_classification  # noqa: F401
from multitune.tasks.base import TASKS, Task, TaskOutput

__all__ = ["TASKS", "Task", "TaskOutput"]
