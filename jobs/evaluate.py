"""Score one checkpoint on test sets and print the table.

    python -m jobs.evaluate --checkpoint DIR --datasets gsm8k,math500 [--limit N]
                            [--config FILE] [--set eval.sources.gsm8k=PATH ...]

Runs the evaluator in this process (no Ray needed for one checkpoint); appends to
run_dir/results.jsonl and rewrites run_dir/report.md and accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from actors.evaluator import Evaluator
from dqo_ray.config import ConfigError, add_config_args, config_from_args, save_resolved
from dqo_ray.tasks.datasets import check_sources

log = logging.getLogger("jobs.evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="HF checkpoint folder")
    parser.add_argument("--datasets", help="comma-separated, e.g. gsm8k,math500")
    parser.add_argument("--limit", type=int, help="problems per dataset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.datasets:
        overrides.append(f"eval.datasets=[{args.datasets}]")
    if args.limit:
        overrides.append(f"eval.limit={args.limit}")
    args.overrides = overrides
    try:
        cfg = config_from_args(args)
        check_sources(cfg, task=False)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        print(f"--checkpoint {checkpoint} is not an HF checkpoint folder", file=sys.stderr)
        return 2
    state = checkpoint.parent / "trainer_state.json"
    step = json.loads(state.read_text())["step"] if state.exists() else 0
    save_resolved(cfg, cfg.run.run_dir)
    evaluator = Evaluator(cfg, str(checkpoint), cfg.run.run_dir)
    evaluator.evaluate(str(checkpoint), step)
    report = Path(cfg.run.run_dir) / "report.md"
    print(report.read_text())
    print(f"report: {report}  plot: {report.with_name('accuracy.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
