"""Downstream tasks, registered by name in TASKS."""

from vlmerge.tasks import classification, nlvr2, retrieval, vqa  # noqa: F401  (registration)
from vlmerge.tasks.base import TASKS, ClassifierTask, Task

__all__ = ["TASKS", "ClassifierTask", "Task"]
