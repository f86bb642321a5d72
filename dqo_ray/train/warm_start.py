"""The warm start: supervised training on a limited set of gold worked solutions before the RL
rounds (pure: no Ray). The prompts are built exactly as the RL rounds build theirs; the
targets are the task's rendered solutions ending in its answer form, then EOS.

The result is cached by content under the pipeline's cache folder (`sft_cache_key`: the start
checkpoint's files, the examples, the settings), so a second run with the same inputs reuses
it, whatever the run is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dqo_ray.config import Config
from dqo_ray.models import load_tokenizer
from dqo_ray.tasks import load_problems, render_solution
from dqo_ray.tasks.items import prompt_items
from dqo_ray.tasks.tinymath_flaws import drop_answer_line, flip_subtractions
from dqo_ray.train.sft import SFTExample, sft_cache_key, supervised_finetune


def cache_dir(cfg: Config) -> Path:
    """pipeline.cache_dir, or output_dir/cache: beside the runs, so it survives as they do
    (a `ray job submit` working folder does not)."""
    return Path(cfg.pipeline.cache_dir or Path(cfg.run.output_dir) / "cache").absolute()


def warm_start_examples(cfg: Config, tokenizer: Any) -> list[SFTExample]:
    ws = cfg.pipeline.warm_start
    problems = load_problems(cfg.task.name, cfg.task.source, ws.split, ws.problems)
    items = prompt_items(problems, tokenizer, cfg.task)
    examples = []
    for problem, item in zip(problems, items, strict=True):
        solution = render_solution(problem, cfg.task.name)
        if ws.flip_subtractions:
            solution = flip_subtractions(solution, ws.flip_subtractions, problem.problem_id)
        if ws.drop_answer_line:
            solution = drop_answer_line(solution, ws.drop_answer_line, problem.problem_id)
        target = tokenizer(solution, add_special_tokens=False)["input_ids"]
        examples.append(SFTExample(list(item.prompt_ids), [*target, tokenizer.eos_token_id]))
    return examples


def warm_start(cfg: Config, base: str) -> dict[str, Any]:
    """Fine-tunes `base` on the warm-start split's gold solutions (cached); returns what the
    pipeline records: the policy folder, the loss at the start and end, and cache use."""
    examples = warm_start_examples(cfg, load_tokenizer(base))
    settings = cfg.pipeline.warm_start
    key = sft_cache_key(base, examples, settings, cfg.run.seed)
    out = cache_dir(cfg) / f"warm-start-{key[:16]}"
    result = supervised_finetune(base, out, examples, settings, cfg.run.seed)
    return {"policy": str(out), "examples": len(examples), "steps": settings.steps,
            "first_loss": result.losses[0], "final_loss": result.losses[-1],
            "cached": result.cached}
