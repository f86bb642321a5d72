"""Check the trajectory store for damaged shards, and move them aside.

    python -m jobs.store verify --config FILE [--quarantine] [--set key=value ...]

Reads every committed shard of `data.store` (default: the run folder's store) and compares
its file with the byte size and SHA-256 its marker recorded at commit. Prints one line per
shard and a summary. `--quarantine` moves each damaged shard (file and marker) to
<store>/quarantine/<name>/: nothing is deleted, the rest of the store trains on, and a
generation round that runs again re-samples the prompts whose samples left with it.
Exit status: 0 when the store is intact (or every damaged shard was quarantined), 1 when
damaged shards remain, 2 for a bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from dqo_ray.config import ConfigError, add_config_args, config_from_args
from dqo_ray.data.store import StoreError, TrajectoryStore


def verify(store: TrajectoryStore, quarantine: bool) -> int:
    began = time.perf_counter()
    shards = store.shards()
    damaged = 0
    for shard in shards:
        problem = store.damage(shard)
        status = "ok" if problem is None else f"DAMAGED: {problem}"
        if problem is not None:
            damaged += 1
            if quarantine:
                status += f" -> moved to {store.quarantine(shard)}"
        print(f"round {shard.round:>3}  {shard.name}  {shard.num_rows:>7} rows  {status}")
    total = sum(s.num_rows for s in shards)
    print(f"{store.root}: {len(shards)} shards, {total} rows checked in "
          f"{time.perf_counter() - began:.1f}s; {damaged} damaged"
          + (", quarantined" if quarantine and damaged else ""))
    return 0 if damaged == 0 or quarantine else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["verify"])
    add_config_args(parser)
    parser.add_argument("--quarantine", action="store_true",
                        help="move damaged shards to <store>/quarantine (never deletes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        return verify(TrajectoryStore(cfg.store), args.quarantine)
    except (ConfigError, StoreError) as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
