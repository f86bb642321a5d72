"""Math tasks: problem sets (GSM8K, MATH, MATH500, synthetic tinymath), prompts, grading.

Pure Python (no Ray): `load_problems` -> `build_prompt` -> generate -> `grade`.

A task is one module (`gsm8k.py`, `math.py`, `tinymath.py`) defining its `Task` record:
how a record becomes a Problem, where its hub data is, its instruction, how an exemplar's
solution is rendered, its grader and its answer key for majority voting. `catalog.TASKS`
lists the records; everything here looks tasks up there by name.

Modules: `task` (the records), `answers` (reading boxes and numbers), `datasets` (files and
hub), `prompts`, `items` (problems -> prompt token ids), `grading` (by task name, never
raising), `grader_pool` (math_verify in time-limited child processes).
"""

from dqo_ray.tasks.answers import extract_boxed
from dqo_ray.tasks.catalog import TASKS, get_task
from dqo_ray.tasks.datasets import load_problems, resolve_source
from dqo_ray.tasks.grader_pool import configure_grading, shutdown_grading_pool
from dqo_ray.tasks.grading import grade, grade_many
from dqo_ray.tasks.gsm8k import extract_gsm8k_answer
from dqo_ray.tasks.prompts import (
    build_prompt,
    has_chat_template,
    render_solution,
    select_exemplars,
    stop_strings,
)
from dqo_ray.tasks.task import DatasetFormatError, Problem, Task
from dqo_ray.tasks.tinymath import (
    TINYMATH_INSTRUCTION,
    TINYMATH_WORDS,
    extract_tinymath_answer,
)

__all__ = [
    "TASKS", "TINYMATH_INSTRUCTION", "TINYMATH_WORDS", "DatasetFormatError", "Problem", "Task",
    "build_prompt", "configure_grading", "extract_boxed", "extract_gsm8k_answer",
    "extract_tinymath_answer", "get_task", "grade", "grade_many", "has_chat_template",
    "load_problems", "render_solution", "resolve_source", "select_exemplars",
    "shutdown_grading_pool", "stop_strings",
]
