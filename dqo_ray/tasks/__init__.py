"""Math tasks: problem sets (GSM8K, MATH, MATH500, synthetic tinymath), prompt templates, answer
grading.

Pure Python (no Ray): `load_problems` -> `build_prompt` -> generate -> `grade`.
"""

from dqo_ray.tasks.datasets import (
    TASKS,
    DatasetFormatError,
    Problem,
    load_problems,
    resolve_source,
)
from dqo_ray.tasks.grading import (
    DEFAULT_TIMEOUT_S,
    configure_grading,
    extract_boxed,
    extract_gsm8k_answer,
    extract_tinymath_answer,
    grade,
    grade_many,
    register_grader,
    registered_tasks,
    shutdown_grading_pool,
)
from dqo_ray.tasks.prompts import (
    DEFAULT_K_SHOT,
    TINYMATH_INSTRUCTION,
    PromptFormat,
    build_prompt,
    has_chat_template,
    register_prompt_format,
    render_solution,
    select_exemplars,
    stop_strings,
)
from dqo_ray.tasks.tinymath import TINYMATH_WORDS, tinymath_tokenizer

__all__ = [
    "DEFAULT_K_SHOT", "DEFAULT_TIMEOUT_S", "TASKS", "TINYMATH_INSTRUCTION", "TINYMATH_WORDS",
    "DatasetFormatError", "Problem", "PromptFormat", "build_prompt", "configure_grading",
    "extract_boxed", "extract_gsm8k_answer", "extract_tinymath_answer", "grade", "grade_many",
    "has_chat_template", "load_problems", "register_grader", "register_prompt_format",
    "registered_tasks", "render_solution", "resolve_source", "select_exemplars",
    "shutdown_grading_pool", "stop_strings", "tinymath_tokenizer",
]
