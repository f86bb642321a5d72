"""GSM8K: grade-school word problems whose answer is one number.

- Records: {"question", "answer"}, where `answer` is the worked solution ending in
  `#### <answer>` (thousands commas dropped from the gold).
- Prompt: asks for a last line `The answer is <number>.`; exemplars are the worked solutions
  with the calculator annotations `<<a*b=c>>` and the `####` line replaced by that line.
- Grading: the final number of the response, looked for in this order: the fixed answer line
  `The answer is <number>.`, `#### <number>`, the last `\\boxed{}`, other "answer is" /
  "answer:" phrasings, and finally the last number in the text. Numbers are compared exactly
  as rationals after dropping thousands commas, `$` and units, so "18.00" == "18" but
  "18.5" != "18".
- Answer key (majority voting): that final number as an exact rational ("1,234" -> "1234",
  3.5 -> "7/2").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from dqo_ray.tasks.answers import extract_boxed, fraction_key, last_number, parse_number
from dqo_ray.tasks.task import DatasetFormatError, Problem, Task, text_field

# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def gsm8k_gold(solution: str) -> str | None:
    """The final answer after the last `####` of a GSM8K solution, commas dropped."""
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def parse_record(record: Mapping[str, Any], split: str, index: int, where: str) -> Problem:
    question = text_field(record, "question", where)
    solution = text_field(record, "answer", where)
    gold = gsm8k_gold(solution)
    if gold is None:
        raise DatasetFormatError(f"{where}: field 'answer' has no '#### <answer>' line")
    if parse_number(gold) is None:
        raise DatasetFormatError(f"{where}: the answer after '####' is not a number: {gold!r}")
    return Problem(f"gsm8k/{split}/{index}", "gsm8k", question, gold, solution,
                   {"split": split})


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------

INSTRUCTION = (
    "Solve the following math word problem step by step. End with a last line of the form "
    '"The answer is <number>." giving the final answer as a number.')
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def render_solution(problem: Problem) -> str:
    steps = _CALCULATOR.sub("", (problem.solution or "").rsplit("####", 1)[0]).rstrip()
    return f"{steps}\nThe answer is {problem.answer}." if steps else \
        f"The answer is {problem.answer}."


# --------------------------------------------------------------------------------------------
# Grading and the answer key
# --------------------------------------------------------------------------------------------

# Anchors for the answer, most specific first. The fixed form is the one our prompt asks for;
# the others catch models (and few-shot habits) that phrase it differently.
_FIXED_ANCHOR = re.compile(r"the\s+answer\s+is\s*:?", re.IGNORECASE)
_HASH_ANCHOR = re.compile(r"####\s*")
_LOOSE_ANCHOR = re.compile(r"answer\s*(?:is|:|=|would\s+be|will\s+be)\s*:?", re.IGNORECASE)
_TEXT_BLOCK = re.compile(r"\\(?:text|mbox|mathrm|textbf|operatorname)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _number_after(text: str, anchor: re.Pattern[str]) -> Fraction | None:
    """The first number on the same line after the last `anchor` that has one."""
    for m in reversed(list(anchor.finditer(text))):
        line = text[m.end():].split("\n", 1)[0]
        value = parse_number(_FRAC.sub(r"\1/\2", line))
        if value is not None:
            return value
    return None


def _number_in_box(content: str) -> Fraction | None:
    # `\boxed{18 \text{ cm}^2}` -> 18, `\boxed{2 \times 9 = 18}` -> 18, `\boxed{\frac{3}{4}}`.
    text = _FRAC.sub(r"\1/\2", content)
    unit = _TEXT_BLOCK.search(text)
    if unit:
        text = text[:unit.start()]
    text = text.rsplit("=", 1)[-1]
    return parse_number(text)


def extract_gsm8k_answer(response: str) -> Fraction | None:
    """The final numeric answer of a GSM8K-style response, or None (see the module docstring)."""
    if not isinstance(response, str) or not response:
        return None
    for anchor in (_FIXED_ANCHOR, _HASH_ANCHOR):
        value = _number_after(response, anchor)
        if value is not None:
            return value
    boxed = extract_boxed(response)
    if boxed is not None:
        value = _number_in_box(boxed)
        if value is not None:
            return value
    value = _number_after(response, _LOOSE_ANCHOR)
    if value is not None:
        return value
    return last_number(response)


def grade(response: str, gold: str) -> bool:
    """The response's final number equals the gold number exactly."""
    expected = parse_number(str(gold))
    got = extract_gsm8k_answer(response)
    return expected is not None and got is not None and got == expected


def numeric_answer_key(response: str) -> str | None:
    """The key of a GSM8K-style final number ("18", "-7/2"), or None without one."""
    value = extract_gsm8k_answer(response)
    return fraction_key(value) if value is not None else None


GSM8K = Task(
    name="gsm8k",
    parse=parse_record,
    hub=lambda split: ("openai/gsm8k", "main"),
    instruction=INSTRUCTION,
    render_solution=render_solution,
    grade=grade,
    answer_key=numeric_answer_key,
)
