"""Ingest an external offline data file (JSONL or Parquet) into the trajectory store.

    python -m jobs.ingest --config FILE --input PATH [--round N] [--dataset NAME] [--strict]
                          [--tokenizer DIR] [--shard-rows N] [--set key.path=value ...]

The store is `data.store`; the tokenizer is `--tokenizer`, else `model.tokenizer`, else the
`model.policy` checkpoint (the built-in "tiny" policy has no folder: pass --tokenizer).
Rewards for `correct`-only records come from `algo.reward_correct` / `algo.reward_incorrect`.
Prints the counts and the rejected records. Exit status: 0 done (even with rejected records),
1 strict ingest stopped at a bad record or the input is unreadable, 2 bad configuration
(including a tokenizer that cannot be loaded).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dqo_ray.config import ConfigError, add_config_args, config_from_args
from dqo_ray.data.ingest import IngestError, ingest_file
from dqo_ray.data.schema import MAX_ERRORS_SHOWN, StoreError
from dqo_ray.data.store import TrajectoryStore
from dqo_ray.io import DiskFull, disk_full_in

log = logging.getLogger("ingest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--input", required=True, help="a .jsonl or .parquet file (or URI)")
    parser.add_argument("--round", type=int, default=0, help="store round (default 0)")
    parser.add_argument("--dataset", help="dataset name for records without one "
                        "(default: the file name)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record and write nothing")
    parser.add_argument("--tokenizer", help="tokenizer folder (overrides model.tokenizer)")
    parser.add_argument("--shard-rows", type=int, default=4096, help="rows per shard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.round < 0 or args.shard_rows < 1:
        print("--round must be >= 0 and --shard-rows >= 1", file=sys.stderr)
        return 2
    tokenizer_path = args.tokenizer or cfg.model.tokenizer or cfg.model.policy
    if tokenizer_path == "tiny":
        # The tiny policy is built in memory per run; its vocabulary is the job's, so there
        # is no canonical tokenizer to ingest with.
        print("model.policy is 'tiny' (no checkpoint folder to take a tokenizer from): pass "
              "--tokenizer DIR or set model.tokenizer", file=sys.stderr)
        return 2

    from dqo_ray.models import load_tokenizer  # imports torch/transformers: only when needed

    if not os.path.isdir(tokenizer_path):
        log.info("tokenizer %s is not a local folder: treating it as a hub name", tokenizer_path)
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    store = TrajectoryStore(cfg.store)
    try:
        report = ingest_file(args.input, store, tokenizer, round=args.round,
                             dataset=args.dataset, strict=args.strict,
                             shard_rows=args.shard_rows,
                             reward_correct=cfg.algo.reward_correct,
                             reward_incorrect=cfg.algo.reward_incorrect,
                             max_prompt_tokens=cfg.data.max_prompt_tokens,
                             max_response_tokens=cfg.data.max_response_tokens)
    except (IngestError, StoreError) as exc:  # the input file or the store: the user's to fix
        print(f"ingest failed: {exc}", file=sys.stderr)
        return 2
    except DiskFull as exc:  # nothing half-written: a re-run after freeing space resumes
        print(f"ingest failed: {disk_full_in(exc)}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"store {store.root}: round {args.round} now has {store.num_rows([args.round])} rows")
    for error in report.rejected[:MAX_ERRORS_SHOWN]:
        print(f"  rejected: {error}")
    if len(report.rejected) > MAX_ERRORS_SHOWN:
        print(f"  ... and {len(report.rejected) - MAX_ERRORS_SHOWN} more rejected")
    if report.ignored_fields:
        print(f"ignored fields: {', '.join(report.ignored_fields)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
