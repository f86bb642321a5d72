"""The table of tasks: the one place loading, prompting, grading and majority voting look a
task up by name. A new task is a module defining its `Task` record, listed here."""

from __future__ import annotations

from dqo_ray.tasks.gsm8k import GSM8K
from dqo_ray.tasks.math import MATH, MATH500
from dqo_ray.tasks.task import Task
from dqo_ray.tasks.tinymath import TINYMATH

TASKS: dict[str, Task] = {task.name: task for task in (GSM8K, MATH, MATH500, TINYMATH)}
"""Task name -> record; `dqo_ray.config.TaskName` lists the same names (a test keeps them
equal)."""


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
