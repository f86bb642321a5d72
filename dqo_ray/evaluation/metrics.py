"""Evaluation metrics, pure logic: pass@k, answer keys for majority voting, per-dataset summaries.

One `ProblemResult` per evaluated problem holds the greedy verdict and, when sampling is on,
the verdict and answer key of every sample. `summarize` turns a dataset's results into the
numbers that go into `results.jsonl`: greedy accuracy, mean sample accuracy, maj@k, pass@k
and, for MATH, breakdowns by subject and level.

Answer keys are what majority voting counts: two samples vote together exactly when their
keys are equal. They are canonical forms that only merge answers of equal value:

- gsm8k: the exact rational of the final number ("The answer is 1,234." and "#### 1234" ->
  "1234"; 3.5 -> "7/2").
- math / math500: the last `\\boxed{}` through `normalize_latex` (spacing, `\\left`/`\\right`,
  `\\dfrac`, surrounding `$`, `^\\circ`), then plain numbers and integer fractions as exact
  rationals, so "\\dfrac{1}{2}", "\\frac12", "1/2" and "0.5" all key "1/2". Anything else stays
  a string: "x+1" and "1+x" are two keys (merging them needs sympy, too slow for every
  sample; the split can only lower maj@k, never credit a wrong answer).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from dqo_ray.tasks.grading import extract_boxed, extract_gsm8k_answer, normalize_latex

AnswerKeyFn = Callable[[str], str | None]

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


def _fraction_key(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


# Whole-answer numeric forms (after normalize_latex, so without spaces): "-12", "0.50",
# "3/4", "\frac{3}{4}", "-\frac34" (brace-less arguments are single characters in TeX).
_PLAIN_NUMBER = re.compile(r"(-?)(\d+(?:\.\d+)?|\.\d+)(?:/(\d+))?")
_LATEX_FRACTION = re.compile(r"(-?)\\frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))")


def _numeric_latex(s: str) -> Fraction | None:
    m = _PLAIN_NUMBER.fullmatch(s)
    if m:
        num, den = Fraction(m.group(2)), Fraction(m.group(3) or 1)
    else:
        m = _LATEX_FRACTION.fullmatch(s)
        if not m:
            return None
        num, den = Fraction(m.group(2) or m.group(3)), Fraction(m.group(4) or m.group(5))
    if den == 0:
        return None
    return -num / den if m.group(1) else num / den


def latex_answer_key(response: str) -> str | None:
    """The key of a `\\boxed{}` answer (see the module docstring), or None without one."""
    boxed = extract_boxed(response)
    if boxed is None:
        return None
    s = normalize_latex(boxed)
    if not s:
        return None
    value = _numeric_latex(s)
    return _fraction_key(value) if value is not None else s


def numeric_answer_key(response: str) -> str | None:
    """The key of a GSM8K-style final number ("18", "-7/2"), or None without one."""
    value = extract_gsm8k_answer(response)
    return _fraction_key(value) if value is not None else None


def _generic_answer_key(response: str) -> str | None:
    # A task without its own key: a boxed answer when there is one, else the final number.
    if extract_boxed(response) is not None:
        return latex_answer_key(response)
    return numeric_answer_key(response)


_ANSWER_KEYS: dict[str, AnswerKeyFn] = {
    "gsm8k": numeric_answer_key,
    "math": latex_answer_key,
    "math500": latex_answer_key,
}


def register_answer_key(task: str, fn: AnswerKeyFn, *, replace: bool = False) -> None:
    """Registers `fn(response) -> key | None` for `task`; tasks without one use the boxed
    answer when present, else the final number."""
    if task in _ANSWER_KEYS and not replace:
        raise ValueError(f"an answer key for task {task!r} is already registered "
                         "(pass replace=True to override it)")
    _ANSWER_KEYS[task] = fn


def answer_key(task: str, response: str) -> str | None:
    """Canonical final answer of `response` for majority voting, or None when it has none.

    Never raises on the response text (like grading: odd text means "no answer").
    """
    if not isinstance(response, str) or not response:
        return None
    try:
        return _ANSWER_KEYS.get(task, _generic_answer_key)(response)
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
