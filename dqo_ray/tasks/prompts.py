"""Prompt construction: the task's instruction (it fixes the answer form the grader looks for
first), optional k-shot exemplars, and the tokenizer's chat template (or a plain
"Question: ...\nAnswer:" template for base models), plus where sampling from it stops.

Exemplars are worked train-split solutions rendered by the task to end in its answer form,
drawn with `select_exemplars`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from dqo_ray.tasks.catalog import get_task
from dqo_ray.tasks.task import Problem


def render_solution(problem: Problem, task: str) -> str:
    """`problem`'s worked solution ending in the task's answer form (an exemplar's answer)."""
    return get_task(task).render_solution(problem)


def select_exemplars(problems: Sequence[Problem], k: int, seed: int = 0) -> list[Problem]:
    """k problems with a worked solution and an answer, drawn from `problems` by a seeded RNG
    (same input, k and seed -> same exemplars). Refuses problems whose `meta["split"]` is
    not "train", so test answers can never leak into prompts."""
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


def stop_strings(tokenizer: Any, *, task: str, use_chat_template: bool = True) -> list[str]:
    """Where sampling a response to `build_prompt`'s prompt should stop besides EOS: nothing
    with a chat template (EOS ends the assistant turn); with the plain template, the task's
    `plain_stop` (the next "Question:"), or a base model writes the next exemplar after its
    answer."""
    if uses_chat_template(tokenizer, use_chat_template):
        return []
    return list(get_task(task).plain_stop)


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
    task_def = get_task(task)
    instruction, render = task_def.instruction, task_def.render_solution
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
            messages.append({"role": "user", "content": f"{instruction}\n\n{shot.question}"})
            messages.append({"role": "assistant", "content": render(shot)})
        messages.append({"role": "user", "content": f"{instruction}\n\n{problem.question}"})
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    blocks = [instruction]
    blocks += [f"Question: {s.question}\nAnswer: {render(s)}" for s in shots]
    blocks.append(f"Question: {problem.question}\nAnswer:")
    return "\n\n".join(blocks)
