"""Evaluation metrics, pure logic: pass@k, answer keys for majority voting, per-dataset summaries.

One `ProblemResult` per evaluated problem holds the greedy verdict and, when sampling is on,
the verdict and answer key of every sample. `summarize` turns a dataset's results into the
numbers that go into `results.jsonl`: greedy accuracy, mean sample accuracy, maj@k, pass@k
and, for MATH, breakdowns by subject and level.

Answer keys are what majority voting counts: two samples vote together exactly when their
keys are equal. Each task defines its key (`Task.answer_key`: canonical forms that only merge
answers of equal value, e.g. GSM8K's exact rational of the final number, MATH's normalised
last box); `answer_key` looks it up by task name and never raises on the response.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dqo_ray.tasks.catalog import get_task

# --------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `c` correct of `n` samples: 1 - C(n-c, k) / C(n, k).

    The probability that k samples drawn without replacement from the n include a correct
    one. Computed as 1 - prod_{i=n-c+1..n} (1 - k/i) (Chen et al. 2021), which never forms
    the huge binomials.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# --------------------------------------------------------------------------------------------
# Answer keys and majority voting
# --------------------------------------------------------------------------------------------


def answer_key(task: str, response: str) -> str | None:
    """Canonical final answer of `response` for majority voting, or None when it has none.

    Never raises on the response text (like grading: odd text means "no answer").
    """
    key = get_task(task).answer_key  # an unknown task raises, as grading does
    if not isinstance(response, str) or not response:
        return None
    try:
        return key(response)
    except Exception:  # pragma: no cover - extraction is written not to raise
        return None


def majority_vote(keys: Sequence[str | None]) -> str | None:
    """The most frequent non-None key; ties go to the key seen first. None if all are None."""
    counts: dict[str, int] = {}
    for key in keys:
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    # max() keeps the first of equal maxima, and dicts keep first-occurrence order.
    return max(counts, key=counts.__getitem__)


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> bool | None:
    """Whether the majority answer is correct, judged by the first sample that gave it, or
    None when no sample has an answer. Samples with equal keys have equal answers, so any
    one of them carries the verdict and nothing needs re-grading."""
    if len(keys) != len(correct):
        raise ValueError(f"{len(keys)} keys but {len(correct)} verdicts")
    winner = majority_vote(keys)
    if winner is None:
        return None
    return bool(correct[list(keys).index(winner)])


# --------------------------------------------------------------------------------------------
# Per-problem results and their summary
# --------------------------------------------------------------------------------------------


@dataclass
class ProblemResult:
    """One problem's evaluation: the greedy verdict and, when sampling, each sample's."""

    problem_id: str
    dataset: str
    greedy_correct: bool
    sample_correct: list[bool] = field(default_factory=list)
    sample_keys: list[str | None] = field(default_factory=list)
    """Answer keys of the samples, aligned with `sample_correct` (or empty)."""
    majority_correct: bool | None = None
    """Verdict of the samples' majority answer; None when no sample gave an answer."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The problem's meta (MATH `subject` / `type`, `level`) for the breakdowns."""

    def __post_init__(self) -> None:
        if self.sample_keys and len(self.sample_keys) != len(self.sample_correct):
            raise ValueError(f"{self.problem_id}: {len(self.sample_keys)} sample keys but "
                             f"{len(self.sample_correct)} sample verdicts")


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _subject(meta: dict[str, Any]) -> str | None:
    value = meta.get("subject") or meta.get("type")  # MATH500 says subject, MATH type
    return str(value) if value else None


def _level(meta: dict[str, Any]) -> str | None:
    value = meta.get("level")
    if value is None or value == "":
        return None
    # MATH: "Level 3" (and "Level ?" for a few train problems); MATH500: the int 3.
    text = str(value).strip()
    return text[len("Level"):].strip() if text.lower().startswith("level") else text


def _level_order(level: str) -> tuple[int, float, str]:
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def _breakdown(results: Sequence[ProblemResult], group: Callable[[dict[str, Any]], str | None],
               order: Callable[[str], Any]) -> dict[str, dict[str, Any]] | None:
    groups: dict[str, list[bool]] = {}
    for r in results:
        name = group(r.meta)
        if name is not None:
            groups.setdefault(name, []).append(r.greedy_correct)
    if not groups:
        return None
    return {name: {"n": len(groups[name]), "greedy_acc": _mean(groups[name])}
            for name in sorted(groups, key=order)}


def summarize(results: Sequence[ProblemResult], k: int | None = None) -> dict[str, Any]:
    """A dataset's metrics: {"n", "greedy_acc", "sample_acc", "maj@k", "pass@k", "by_subject",
    "by_level"}.

    - greedy_acc: fraction of problems whose greedy answer is correct (None for no problems).
    - sample_acc: fraction of all samples that are correct (None without samples).
    - maj@k, pass@k: only with k > 1 samples. `k` defaults to the fewest samples any problem
      has; every problem needs at least k (pass@k uses all n of a problem's samples, the
      unbiased estimator). maj@k reads each problem's `majority_correct`, where None (no
      sample gave an answer) counts as wrong.
    - by_subject / by_level: {name: {"n", "greedy_acc"}}, only when some problem's meta has
      the field (MATH), levels as "1".."5".
    """
    summary: dict[str, Any] = {
        "n": len(results),
        "greedy_acc": _mean([r.greedy_correct for r in results]),
        "sample_acc": _mean([c for r in results for c in r.sample_correct]),
    }
    counts = [len(r.sample_correct) for r in results]
    if k is None and counts and min(counts) > 0:
        k = min(counts)
    if k is not None and k > 1:
        short = [r.problem_id for r in results if len(r.sample_correct) < k]
        if short:
            raise ValueError(f"{len(short)} problems have fewer than k={k} samples "
                             f"(first: {short[0]!r})")
        if results:
            summary[f"maj@{k}"] = _mean([bool(r.majority_correct) for r in results])
            summary[f"pass@{k}"] = sum(
                pass_at_k(len(r.sample_correct), sum(r.sample_correct), k) for r in results
            ) / len(results)
    for name, group, order in (("by_subject", _subject, str), ("by_level", _level, _level_order)):
        table = _breakdown(results, group, order)
        if table is not None:
            summary[name] = table
    return summary
