"""DQO beside its baselines on the same prompts, samples and training budget, and beside the
control "continue supervised training on the warm-start gold set for the same budget".

    python -m jobs.compare --config configs/demo-compare.yaml [--set key=value ...]

Each algorithm in `compare.algos` is a full pipeline run (jobs/pipeline.py) named
<run.name>-<algo> that differs from the others only in algo.name: the same warm start
(cached), the same prompts, the same sampling seeds, the same rounds x steps x batch. The
control fine-tunes the warm-start checkpoint on its gold set for rounds x max_steps steps of
the same batch size and is scored by the same evaluator. Everything resumes (state files,
cache). Writes <run.name>/compare.md (one table) and compare.png (one plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import ray

from actors.evaluator import start_evaluator
from dqo_ray.config import Config, ConfigError, add_config_args, config_from_args, to_dict
from dqo_ray.driver_lock import DriverLock, RunFolderBusy
from dqo_ray.evaluation import read_results
from dqo_ray.evaluation.paired import write_comparison
from dqo_ray.models import load_tokenizer
from dqo_ray.run_state import RunState, StateError
from dqo_ray.runtime import ENGINE_LOG, init_ray
from dqo_ray.train.sft import supervised_finetune
from dqo_ray.train.warm_start import cache_dir, warm_start_examples
from jobs.pipeline import Pipeline, plan_for_run
from jobs.preflight import check_run_inputs

log = logging.getLogger("jobs.compare")


def variant(cfg: Config, name: str, **sections: Any) -> Config:
    """cfg for one side of the comparison: its own run folder and store."""
    run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-{name}")
    data = dataclasses.replace(cfg.data, store=f"{run.run_dir}/store")
    return dataclasses.replace(cfg, run=run, data=data, **sections)


def run_algorithm(cfg: Config, algo: str, label: str | None = None) -> Path:
    """One pipeline run named <run.name>-<label> (label: the algorithm's name by default);
    rft and dpo read no process-reward data, so theirs skips those rollouts."""
    generation = cfg.generation
    if algo in ("rft", "dpo") and generation.process_reward_samples:
        generation = dataclasses.replace(generation, process_reward_samples=0)
    cfg = variant(cfg, label or algo, algo=dataclasses.replace(cfg.algo, name=algo),
                  generation=generation)
    log.info("== %s: pipeline run %s", label or algo, cfg.run.run_dir)
    with DriverLock(cfg.run.run_dir):
        Pipeline(cfg, RunState(cfg.run.run_dir, to_dict(cfg))).run()
    return Path(cfg.run.run_dir)


def run_gold_control(cfg: Config, start: str) -> Path:
    """Supervised training continued from the warm start on the same gold set, for the RL
    runs' budget; evaluated like them (start row = the warm start, shared)."""
    cfg = variant(cfg, "gold-control")
    run_dir = Path(cfg.run.run_dir).absolute()
    tcfg = cfg.trainer
    steps = cfg.pipeline.rounds * tcfg.max_steps
    batch = tcfg.micro_batch_size * tcfg.grad_accum_steps * tcfg.num_workers
    settings = dataclasses.replace(cfg.pipeline.warm_start, steps=steps, batch_size=batch,
                                   warmup_steps=0)
    examples = warm_start_examples(cfg, load_tokenizer(start))
    out = cache_dir(cfg) / f"gold-control-{Path(start).name}-{steps}x{batch}"
    log.info("== gold control: %d more supervised steps x batch %d on %d gold solutions",
             steps, batch, len(examples))
    result = supervised_finetune(start, out, examples, settings, cfg.run.seed)
    if not any(r.get("checkpoint") == str(out) for r in read_results(run_dir)):
        evaluator = start_evaluator(cfg, start, str(run_dir))
        ray.get(evaluator.evaluate.remote(start, 0, None))
        ray.get(evaluator.evaluate.remote(str(out), steps, cfg.pipeline.rounds - 1))
        ray.kill(evaluator)
    log.info("gold control: loss %.4f -> %.4f", result.losses[0], result.losses[-1])
    return run_dir


def compare(cfg: Config) -> Path:
    """Runs every variant (resuming finished ones) and writes the comparison."""
    runs: dict[str, Path] = {}
    for algo in cfg.compare.algos:
        runs[algo] = run_algorithm(cfg, algo)
    if cfg.compare.gold_control:
        first = RunState(runs[cfg.compare.algos[0]], to_dict(variant(
            cfg, cfg.compare.algos[0], algo=dataclasses.replace(cfg.algo,
                                                                name=cfg.compare.algos[0]))))
        warm = first.finished("start/warm")
        if warm is None:
            raise ConfigError(["compare.gold_control needs pipeline.warm_start.enabled"])
        runs["gold control"] = run_gold_control(cfg, warm["policy"])
    out = Path(cfg.run.run_dir)
    write_comparison(out, {name: read_results(path) for name, path in runs.items()},
                     title=f"{cfg.run.name}: same prompts, samples and budget")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        check_run_inputs(cfg)
        init_ray(cfg.ray, Path(cfg.run.run_dir) / ENGINE_LOG)
        plan = plan_for_run(cfg)  # the pipeline's start check, once for every variant
        if not plan.ok:
            print(plan.refusal(), file=sys.stderr)
            return 2
        began = time.perf_counter()
        out = compare(cfg)
    except (ConfigError, StateError, RunFolderBusy) as exc:
        print(exc, file=sys.stderr)
        return 2
    print((out / "compare.md").read_text())
    print(f"{out / 'compare.md'}, {out / 'compare.png'} ({time.perf_counter() - began:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
