"""Problems -> prompt items (templated text + token ids + gold), shared by generation and
evaluation. Pure: no Ray."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dqo_ray.config import TaskConfig
from dqo_ray.tasks.datasets import load_problems
from dqo_ray.tasks.prompts import build_prompt, select_exemplars, stop_strings
from dqo_ray.tasks.task import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptItem:
    prompt_id: str
    dataset: str
    task: str  # task name: how dqo_ray.tasks.grade and answer keys read the response
    prompt: str  # the templated prompt text
    prompt_ids: list[int]
    gold: str  # gold final answer
    meta: tuple[tuple[str, Any], ...] = ()  # e.g. MATH level / subject, for breakdowns
    stop: tuple[str, ...] = ()
    """Stop strings for sampling a response to this prompt (`prompts.stop_strings`: the
    plain template's next "Question:"; none with a chat template). They belong to the prompt
    because the template that was used decides them."""


def prompt_items(problems: Sequence[Problem], tokenizer: Any, task: TaskConfig,
                 exemplars: Sequence[Problem] = ()) -> list[PromptItem]:
    stop = tuple(stop_strings(tokenizer, task=task.name,
                              use_chat_template=task.use_chat_template))
    items = []
    for problem in problems:
        text = build_prompt(problem, tokenizer, task=task.name, k_shot=len(exemplars),
                            exemplars=list(exemplars) or None,
                            use_chat_template=task.use_chat_template)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        items.append(PromptItem(problem.problem_id, problem.dataset, task.name, text,
                                list(ids), problem.answer, tuple(sorted(problem.meta.items())),
                                stop))
    return items


def load_items(task: TaskConfig, tokenizer: Any, seed: int = 0) -> list[PromptItem]:
    """The task's problems (task.split, task.limit) as prompt items, with k-shot exemplars
    drawn from the train split when task.k_shot > 0."""
    problems = load_problems(task.name, task.source, task.split, task.limit)
    exemplars: list[Problem] = []
    if task.k_shot:
        exemplars = select_exemplars(load_problems(task.name, task.source, "train"),
                                     task.k_shot, seed)
    return prompt_items(problems, tokenizer, task, exemplars)


def within_prompt_limit(items: Sequence[PromptItem], max_tokens: int) -> list[PromptItem]:
    """The items whose prompt has at most `max_tokens` (data.max_prompt_tokens) tokens; the
    others are left out with a warning (a cut prompt would be another problem), and none
    fitting is an error."""
    kept = [i for i in items if len(i.prompt_ids) <= max_tokens]
    if len(kept) < len(items):
        longest = max(len(i.prompt_ids) for i in items)
        message = (f"{len(items) - len(kept)} of {len(items)} prompts are longer than "
                   f"data.max_prompt_tokens ({max_tokens}; the longest has {longest})")
        if not kept:
            raise ValueError(f"{message}: none is left to sample; raise data.max_prompt_tokens "
                             "or lower task.k_shot")
        log.warning("%s: left out of generation", message)
    return kept
