"""Sample one round of trajectories with the generator pool and write them to the store.

    python -m jobs.generate --config FILE [--round N] [--checkpoint DIR] [--set key=value ...]

Prompts come from the `task` section; the pool (`generation` section) samples, grades and
writes to `data.store`. Re-running the same round skips prompts already stored (resume).
Prints a summary: prompts, samples, accuracy, mean length, tokens/s.
"""

from __future__ import annotations

import argparse
import logging
import sys

from actors.generator import GeneratorPool
from dqo_ray.config import ConfigError, add_config_args, config_from_args, save_resolved
from dqo_ray.data.store import TrajectoryStore
from dqo_ray.models import load_tokenizer, resolve_checkpoint
from dqo_ray.runtime import init_ray
from dqo_ray.tasks.datasets import check_sources
from dqo_ray.tasks.items import load_items

log = logging.getLogger("jobs.generate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--round", type=int, default=0, help="round number to write")
    parser.add_argument("--checkpoint", help="policy to sample from (default model.policy)")
    parser.add_argument("--policy-version", type=int, help="recorded version (default: round)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        checkpoint = resolve_checkpoint(args.checkpoint, cfg.run.run_dir, "--checkpoint") \
            if args.checkpoint else resolve_checkpoint(cfg.model.policy, cfg.run.run_dir,
                                                       "model.policy")
        check_sources(cfg, evaluation=False)
        tokenizer = load_tokenizer(checkpoint)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    save_resolved(cfg, cfg.run.run_dir)
    items = load_items(cfg.task, tokenizer, cfg.run.seed)
    log.info("%d prompts from %s/%s", len(items), cfg.task.name, cfg.task.split)
    init_ray(cfg.ray)
    pool = GeneratorPool(cfg, checkpoint)
    summary = pool.generate(items, args.round, args.policy_version if args.policy_version
                            is not None else args.round, TrajectoryStore(cfg.store))
    pool.shutdown()
    print(f"round {args.round}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
