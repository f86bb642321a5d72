"""Grading by task name: `grade(task, response, gold) -> bool` and its batch form, for the
generator and evaluator actors. Each task's grader lives in its module (gsm8k.py, math.py,
tinymath.py); this adds the contract every caller relies on.

Contract: grading never raises on any response or gold text (garbage, empty, huge, not even
a string) and returns False instead; MATH's math_verify work runs under a per-call time limit
(`grader_pool`). Only an unknown task name raises (ValueError). Safe to call from any thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dqo_ray.tasks.catalog import get_task

log = logging.getLogger(__name__)


def grade(task: str, response: str, gold: str) -> bool:
    """True when `response` reaches the gold final answer of a `task` problem."""
    grader = get_task(task).grade
    try:
        return bool(grader(response, gold))
    except Exception:  # a grader bug on odd text must not kill a rollout
        log.warning("grader for %s raised; graded False", task, exc_info=True)
        return False


def grade_many(task: str, responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """`grade` over pairs (same length), using the task's batch grader when it has one."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    batch = get_task(task).grade_batch
    if batch is not None:
        try:
            return [bool(x) for x in batch(responses, golds)]
        except Exception:
            log.warning("batch grader for %s raised; grading one by one", task, exc_info=True)
    return [grade(task, r, g) for r, g in zip(responses, golds, strict=True)]
