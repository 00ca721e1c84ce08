"""Datasets, prompts and metrics."""

from kvcomm.tasks import multihop as _multihop  # noqa: F401  (registers the task)
from kvcomm.tasks import relay as _relay  # noqa: F401  (registers the task)
from kvcomm.tasks.base import QA_INSTRUCTION, Item, Task
from kvcomm.tasks.loaders import TASKS, load_task
from kvcomm.tasks.metrics import METRICS, contains, exact_match, normalize, paper_f1, set_f1

__all__ = [
    "METRICS", "QA_INSTRUCTION", "TASKS", "Item", "Task", "contains", "exact_match", "load_task", "normalize",
    "paper_f1", "set_f1",
]
