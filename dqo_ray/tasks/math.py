"""MATH (Hendrycks et al.) and MATH500, its 500-problem test subset: competition problems
whose answer is a LaTeX expression.

The two share everything but their records:
- MATH: {"problem", "solution", "level", "type"}; the gold is the solution's last `\\boxed{}`.
- MATH500: {"problem", "solution", "answer", "subject", "level", "unique_id"}; the gold is
  the `answer` field. It has no train split: its few-shot exemplars come from MATH train,
  read from the same folder (`math500_<split>` is looked for first, then `<split>`, whose
  plain MATH records are parsed as MATH's).
Both ids are MATH's `unique_id` ("test/algebra/1.json"), so MATH500 problems can be
excluded from MATH training.

- Prompt: asks for the final answer inside `\\boxed{}`; MATH solutions already box theirs.
- Grading: the response's last `\\boxed{...}` (or `\\fbox{...}`) against the gold, first as
  normalised strings (the common case, microseconds) and only when those differ by
  `math_verify` (sympy equivalence: fractions vs decimals, intervals, tuples, ...) in the
  time-limited `grader_pool`.
- Answer key (majority voting): the last box through `normalize_latex`, then plain numbers
  and integer fractions as exact rationals, so "\\dfrac{1}{2}", "\\frac12", "1/2" and "0.5"
  all key "1/2". Anything else stays a string: "x+1" and "1+x" are two keys (merging them
  needs sympy, too slow for every sample; the split can only lower maj@k, never credit a
  wrong answer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from dqo_ray.tasks.answers import extract_boxed, fraction_key
from dqo_ray.tasks.grader_pool import verify_many
from dqo_ray.tasks.task import DatasetFormatError, Problem, Task, optional_text, text_field

# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _meta(record: Mapping[str, Any], split: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"split": split}
    for key in ("level", "type", "subject"):
        if record.get(key) is not None:
            meta[key] = record[key]
    return meta


def parse_math_record(record: Mapping[str, Any], split: str, index: int, where: str,
                      dataset: str = "math") -> Problem:
    question = text_field(record, "problem", where)
    solution = text_field(record, "solution", where)
    gold = extract_boxed(solution)
    if gold is None:
        raise DatasetFormatError(f"{where}: field 'solution' has no complete \\boxed{{...}} "
                                 "answer")
    meta = _meta(record, split)
    if not gold:
        # Two MATH train solutions (number_theory 7115, 7117) box nothing: kept, so the
        # counts match the published split, but flagged; no answer ever grades correct
        # against an empty gold and select_exemplars skips them.
        meta["empty_answer"] = True
    problem_id = record.get("unique_id") or f"{dataset}/{split}/{index}"
    return Problem(str(problem_id), dataset, question, gold, solution, meta)


def parse_math500_record(record: Mapping[str, Any], split: str, index: int,
                         where: str) -> Problem:
    if "answer" not in record:
        # A plain MATH record (the train split used for exemplars): extract as for MATH.
        return parse_math_record(record, split, index, where, dataset="math500")
    question = text_field(record, "problem", where)
    gold = text_field(record, "answer", where).strip()
    if not gold:
        raise DatasetFormatError(f"{where}: field 'answer' is empty")
    solution = optional_text(record, "solution", where)
    problem_id = record.get("unique_id") or f"math500/{split}/{index}"
    return Problem(str(problem_id), "math500", question, gold, solution, _meta(record, split))


_MATH_HUB = ("DigitalLearningGmbH/MATH-lighteval", "default")


def _math500_hub(split: str) -> tuple[str, str | None]:
    return ("HuggingFaceH4/MATH-500", None) if split == "test" else _MATH_HUB


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------

INSTRUCTION = ("Solve the following math problem step by step. Put your final answer within "
               "\\boxed{}.")


def render_solution(problem: Problem) -> str:
    solution = (problem.solution or "").strip()
    # MATH solutions already box their answer; one without a box gets it appended.
    return solution if "\\boxed" in solution or "\\fbox" in solution else \
        f"{solution}\nThe final answer is $\\boxed{{{problem.answer}}}$.".strip()


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------

_SPACING = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~|\s+")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")


def normalize_latex(answer: str) -> str:
    """A conservative canonical form of a LaTeX answer for the string fast path.

    Only rewrites that never change the value (spacing, `\\left`/`\\right`, `\\dfrac`,
    `\\displaystyle`, surrounding `$`, a trailing period, `^\\circ`), so equal normal forms
    imply equivalence and everything else is left to math_verify.
    """
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = s.replace("\\displaystyle", "")
    s = _LEFT_RIGHT.sub("", s)
    s = _DEGREES.sub("", s)
    s = _SPACING.sub("", s)
    return s.rstrip(".")


def _gold_latex(gold: str) -> str:
    # The gold is the bare answer; tolerate one passed still boxed.
    return (extract_boxed(gold) if "\\boxed" in gold or "\\fbox" in gold else gold) or ""


def _prepare(response: str, gold: str) -> tuple[bool | None, tuple[str, str] | None]:
    """(verdict, None) when settled without sympy, else (None, (gold, pred)) to verify."""
    if not isinstance(response, str) or not isinstance(gold, str):
        return False, None
    gold = _gold_latex(gold)
    pred = extract_boxed(response)
    if not pred or not gold.strip():
        return False, None
    if normalize_latex(pred) == normalize_latex(gold):
        return True, None
    return None, (gold, pred)


def grade(response: str, gold: str) -> bool:
    """The response's last `\\boxed{}` is equivalent to the gold LaTeX answer."""
    verdict, job = _prepare(response, gold)
    if job is None:
        return bool(verdict)
    return verify_many([job])[0]


def grade_batch(responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """`grade` over a batch; the math_verify cases run in parallel in the pool."""
    results: list[bool] = []
    jobs: list[tuple[str, str]] = []
    where: list[int] = []
    for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
        verdict, job = _prepare(response, gold)
        results.append(bool(verdict))
        if job is not None:
            jobs.append(job)
            where.append(i)
    for i, ok in zip(where, verify_many(jobs), strict=True):
        results[i] = ok
    return results


# --------------------------------------------------------------------------------------------
# Answer key
# --------------------------------------------------------------------------------------------

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
    return fraction_key(value) if value is not None else s


MATH = Task(
    name="math",
    parse=parse_math_record,
    hub=lambda split: _MATH_HUB,
    instruction=INSTRUCTION,
    render_solution=render_solution,
    grade=grade,
    grade_batch=grade_batch,
    answer_key=latex_answer_key,
)
MATH500 = Task(
    name="math500",
    parse=parse_math500_record,
    hub=_math500_hub,
    file_stems=lambda split: (f"math500_{split}", split),
    instruction=INSTRUCTION,
    render_solution=render_solution,
    grade=grade,
    grade_batch=grade_batch,
    answer_key=latex_answer_key,
)
