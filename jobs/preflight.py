"""What a run reads, checked before anything starts: each problem is one line of a
ConfigError naming the setting (the jobs print it and exit with status 2)."""

from __future__ import annotations

from dqo_ray.config import Config, ConfigError
from dqo_ray.models import resolve_checkpoint
from dqo_ray.tasks.datasets import check_sources


def check_run_inputs(cfg: Config) -> None:
    """The pipeline's inputs: the task's and evaluation's data files, and the checkpoint
    folders named by model.policy (unless "tiny", built by the run) and model.reference."""
    problems = []
    try:
        check_sources(cfg)
    except ConfigError as exc:
        problems += exc.problems
    models = [("model.policy", cfg.model.policy), ("model.reference", cfg.model.reference)]
    for key, name in models:
        if name is None or name == "tiny":
            continue
        try:
            resolve_checkpoint(name, cfg.run.run_dir, key)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
