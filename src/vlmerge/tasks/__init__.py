"""Downstream tasks, registered by name in TASKS."""

from vlmerge.tasks import classification, nlvr2, retrieval, segmentation, vqa  # noqa: F401  (registration)
from vlmerge.tasks.base import TASKS, ClassifierTask, Task

DEFAULT_TASKS = tuple(TASKS)  # what listing TASKS gives: every task but the opt-in ones (segmentation)

__all__ = ["DEFAULT_TASKS", "TASKS", "ClassifierTask", "Task"]
