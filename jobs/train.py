"""Train on an existing trajectory store: reference stage, then Ray Train + DeepSpeed.

    python -m jobs.train --config FILE [--set key=value ...]

Resumable: re-running the same command continues from the last checkpoint of the run folder.
Prints where the checkpoints are.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dqo_ray.config import ConfigError, add_config_args, config_from_args, save_resolved
from dqo_ray.data.store import StoreError, TrajectoryStore
from dqo_ray.data.streams import score_reference
from dqo_ray.models import load_tokenizer, resolve_checkpoint
from dqo_ray.runtime import init_ray
from dqo_ray.train.ray_trainer import train_on_store

log = logging.getLogger("jobs.train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--kill-rank1-pid-file", help=argparse.SUPPRESS)  # fault-injection tests
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        policy = resolve_checkpoint(cfg.model.policy, cfg.run.run_dir, "model.policy")
        reference = resolve_checkpoint(cfg.model.reference or cfg.model.policy, cfg.run.run_dir,
                                       "model.reference")
        if cfg.model.value is not None and cfg.algo.has_value_model:
            resolve_checkpoint(cfg.model.value, cfg.run.run_dir, "model.value")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    log.info("resolved config: %s", save_resolved(cfg, cfg.run.run_dir))
    init_ray(cfg.ray)
    store = TrajectoryStore(cfg.store)
    pad_id = load_tokenizer(policy).pad_token_id
    try:
        score_reference(store, reference, pad_id, cfg.data.rounds or None, cfg.data.ref_actors,
                        cfg.data.ref_batch_size, cfg.trainer.use_gpu)
        result = train_on_store(cfg, policy, pid_file=args.kill_rank1_pid_file)
    except StoreError as exc:  # damaged data: named, with what to do; not a traceback
        print(exc, file=sys.stderr)
        return 2
    print(f"final checkpoint: {result.checkpoint}")
    print(f"policy (HF format, loadable by vLLM): {result.policy}")
    print(f"all checkpoints: {Path(result.checkpoint).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
