"""Prompt construction: an instruction fixing the answer form, optional k-shot exemplars, and
the tokenizer's chat template (or a plain "Question: ...\\nAnswer:" template for base models).

Answer forms, which the graders look for first:
- gsm8k: a last line `The answer is <number>.`
- math, math500: the final answer inside `\\boxed{}`.
- tinymath: one equation per line, then `The answer is <number>.` (a short instruction: every
  prompt token costs a tiny model).

Exemplars are worked train-split solutions rewritten to end in that form (GSM8K's calculator
annotations `<<a*b=c>>` and `#### n` line are replaced), drawn with `select_exemplars`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dqo_ray.tasks.datasets import Problem

DEFAULT_K_SHOT = {"gsm8k": 8, "math": 4, "math500": 4, "tinymath": 0}
"""The usual exemplar counts for base models (instruction-tuned models: 0; tinymath's tiny
models are trained on the zero-shot prompt)."""
PLAIN_STOP = ("\nQuestion:",)
"""Where a base model continuing the plain template starts the next exemplar."""


@dataclass(frozen=True)
class PromptFormat:
    """How a task asks for its answer and renders an exemplar's worked solution."""

    instruction: str
    render_solution: Callable[[Problem], str]


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _gsm8k_solution(problem: Problem) -> str:
    steps = _CALCULATOR.sub("", (problem.solution or "").rsplit("####", 1)[0]).rstrip()
    return f"{steps}\nThe answer is {problem.answer}." if steps else \
        f"The answer is {problem.answer}."


def _math_solution(problem: Problem) -> str:
    solution = (problem.solution or "").strip()
    # MATH solutions already box their answer; one without a box gets it appended.
    return solution if "\\boxed" in solution or "\\fbox" in solution else \
        f"{solution}\nThe final answer is $\\boxed{{{problem.answer}}}$.".strip()


_GSM8K = PromptFormat(
    "Solve the following math word problem step by step. End with a last line of the form "
    '"The answer is <number>." giving the final answer as a number.',
    _gsm8k_solution,
)
_MATH = PromptFormat(
    "Solve the following math problem step by step. Put your final answer within \\boxed{}.",
    _math_solution,
)
TINYMATH_INSTRUCTION = "Solve step by step."


def _tinymath_solution(problem: Problem) -> str:
    # The generator's solution already ends in "The answer is N."; a file record may lack one.
    return problem.solution or f"The answer is {problem.answer}."


_TINYMATH = PromptFormat(TINYMATH_INSTRUCTION, _tinymath_solution)
_FORMATS: dict[str, PromptFormat] = {"gsm8k": _GSM8K, "math": _MATH, "math500": _MATH,
                                     "tinymath": _TINYMATH}


def register_prompt_format(task: str, fmt: PromptFormat, *, replace: bool = False) -> None:
    """Adds the prompt format of a new task (its grader goes to `register_grader`)."""
    if task in _FORMATS and not replace:
        raise ValueError(f"a prompt format for task {task!r} is already registered")
    _FORMATS[task] = fmt


def prompt_format(task: str) -> PromptFormat:
    """The registered prompt format of `task`."""
    try:
        return _FORMATS[task]
    except KeyError:
        raise ValueError(f"no prompt format for task {task!r}; known: "
                         f"{', '.join(sorted(_FORMATS))}") from None


def render_solution(problem: Problem, task: str) -> str:
    """`problem`'s worked solution ending in the task's answer form (an exemplar's answer)."""
    return prompt_format(task).render_solution(problem)


def select_exemplars(problems: Sequence[Problem], k: int, seed: int = 0) -> list[Problem]:
    """k problems with a worked solution and an answer, drawn from `problems` by a seeded RNG
    (same input, k and seed -> same exemplars). Refuses problems whose `meta["split"]` is not "train", so
    test answers can never leak into prompts."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    leaked = [p.problem_id for p in problems if p.meta.get("split", "train") != "train"]
    if leaked:
        raise ValueError(f"exemplars must come from the train split; got {len(leaked)} "
                         f"problems from another split (e.g. {leaked[0]!r})")
    candidates = [p for p in problems if p.solution and p.answer]
    if k > len(candidates):
        raise ValueError(f"asked for {k} exemplars but only {len(candidates)} problems have "
                         "a worked solution and an answer")
    return random.Random(seed).sample(candidates, k)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` carries a chat template."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer: Any, use_chat_template: bool = True) -> bool:
    """Whether `build_prompt` renders through the chat template for these settings."""
    return use_chat_template and has_chat_template(tokenizer)


def stop_strings(tokenizer: Any, *, use_chat_template: bool = True) -> list[str]:
    """Extra stop strings for generation: none with a chat template (EOS ends the turn), the
    next "Question:" with the plain template."""
    return [] if uses_chat_template(tokenizer, use_chat_template) else list(PLAIN_STOP)


def build_prompt(problem: Problem, tokenizer: Any, *, task: str, k_shot: int = 0,
                 exemplars: Sequence[Problem] | None = None,
                 use_chat_template: bool = True) -> str:
    """The prompt text for `problem` (generation starts right after it).

    With a chat template (and `use_chat_template`): one user turn per exemplar question, the
    exemplar's worked solution as the assistant turn, then the problem, with the generation
    prompt appended. Every user turn carries the instruction so the format request sits next
    to the question the model answers. Otherwise: the instruction, then
    "Question: ...\\nAnswer: ..." blocks, ending with "Question: <problem>\\nAnswer:".

    `exemplars` (e.g. `select_exemplars(train, k_shot + 1, seed)`) supplies the k-shot
    examples: the first `k_shot` of them that are not `problem` itself, so one spare keeps
    train-split prompts from quoting their own answer. The chat-rendered text may already hold
    the BOS token: tokenize it without adding special tokens.
    """
    fmt = prompt_format(task)
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    shots: list[Problem] = []
    if k_shot:
        if exemplars is None:
            raise ValueError(f"k_shot={k_shot} needs exemplars (select_exemplars(train, ...))")
        shots = [e for e in exemplars
                 if e.problem_id != problem.problem_id and e.question != problem.question]
        if len(shots) < k_shot:
            raise ValueError(f"k_shot={k_shot} but only {len(shots)} usable exemplars "
                             f"(excluding the problem itself); select one more")
        shots = shots[:k_shot]
    if uses_chat_template(tokenizer, use_chat_template):
        messages: list[dict[str, str]] = []
        for shot in shots:
            messages.append({"role": "user", "content": f"{fmt.instruction}\n\n{shot.question}"})
            messages.append({"role": "assistant", "content": fmt.render_solution(shot)})
        messages.append({"role": "user", "content": f"{fmt.instruction}\n\n{problem.question}"})
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    blocks = [fmt.instruction]
    blocks += [f"Question: {s.question}\nAnswer: {fmt.render_solution(s)}" for s in shots]
    blocks.append(f"Question: {problem.question}\nAnswer:")
    return "\n\n".join(blocks)
