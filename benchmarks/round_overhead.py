"""Round overhead: where a pipeline's rounds spend their time (the work vs its start-ups).

    python benchmarks/round_overhead.py [--config configs/demo.yaml] [--name NAME]
                                        [--set key=value ...] [--label TEXT] [--record]
    python benchmarks/round_overhead.py --analyze RUN_DIR [--log LOG] [--label TEXT] [--record]

Runs the pipeline (`python -m jobs.pipeline`, output to runs/<NAME>.log; a re-run continues
or re-reads a finished run, so the benchmark is resumable) and then reads the run's own
records (pipeline_state.json, train_metrics.jsonl; `dqo_ray.evaluation.round_costs`): per
round the sampling (and the part of it no training ran beside), the reference stage, the
trainer's start (to its first step), optimizer steps, checkpoint writes, the rest of the
train stage, the engines' weight refresh; then overhead = (wall time after round 0's sampling
- step time) / that wall time. `--analyze` reads a finished run (also one written by older
code: per-round metrics folders, refresh times from its log). The end-to-end time of the
run is its stages' span (start of the first to the end of the last). `--record` appends the
result to benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import machine  # noqa: E402

from dqo_ray.evaluation.round_costs import breakdown_markdown, round_breakdown  # noqa: E402
from dqo_ray.io import read_jsonl  # noqa: E402

REFRESH = re.compile(r"weights refreshed from \S+ in ([0-9.]+)s")
SAMPLING = re.compile(r"generation round (\d+):")


def metrics_of(run: Path) -> list[dict]:
    """Rank 0's metrics lines: the run's (one trainer for all rounds) or, for runs of older
    code, each round folder's (its round taken from the folder's name)."""
    lines = read_jsonl(run / "train_metrics.jsonl")
    for folder in sorted(run.glob("round*/"), key=lambda p: int(p.name[5:] or 0)):
        lines += [{"round": int(folder.name[5:]), **line}
                  for line in read_jsonl(folder / "train_metrics.jsonl")]
    return lines


def refreshes_of(log: Path | None) -> dict[int, float]:
    """Refresh seconds from a log, for runs whose state did not record them: a refresh
    belongs to the data round whose sampling the log shows next."""
    if log is None or not log.exists():
        return {}
    out, pending = {}, None
    for line in log.read_text(errors="replace").splitlines():
        if found := REFRESH.search(line):
            pending = float(found.group(1))
        elif pending is not None and (found := SAMPLING.search(line)):
            out[int(found.group(1))], pending = pending, None
    return out


def analyze(run: Path, log: Path | None) -> tuple[dict, float, int]:
    stages = json.loads((run / "pipeline_state.json").read_text())["stages"]
    costs = round_breakdown(stages, metrics_of(run), refreshes_of(log))
    span = (max(s["finished_at"] for s in stages.values())
            - min(s["finished_at"] - s["seconds"] for s in stages.values()))
    starts = 0
    if log is not None and log.exists():
        text = log.read_text(errors="replace")
        # older code: one Ray Train run per round; now: one per run, its starts logged
        starts = (len(re.findall(r"trainer worker group start \d+", text))
                  or len(re.findall(r"training \d+ workers on \d+ shards", text)))
    return costs, span, starts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--name", default="round-overhead")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--analyze", type=Path, help="a finished run folder: read, do not run")
    parser.add_argument("--log", type=Path, help="with --analyze: the run's console log")
    parser.add_argument("--label", default="", help="what this run measures (for --record)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.analyze:
        run, log = args.analyze, args.log
    else:
        log = REPO / "runs" / f"{args.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        sets = [a for o in [f"run.name={args.name}", *args.set] for a in ("--set", o)]
        print(f"running the pipeline ({args.config}, run.name={args.name}); log: {log}")
        began = time.time()
        with open(log, "a") as out:
            code = subprocess.call([sys.executable, "-m", "jobs.pipeline", "--config",
                                    args.config, *sets], cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
        if code != 0:
            print(f"the pipeline failed (exit {code}); see {log}", file=sys.stderr)
            return code
        print(f"pipeline done in {time.time() - began:.0f}s")
        run = REPO / "runs" / args.name
    costs, span, starts = analyze(run, log)
    table = breakdown_markdown(costs)
    summary = (f"stages' span (end to end): {span:.0f} s; Ray Train worker-group starts: "
               f"{starts or 'not in the log'}")
    print(table + "\n" + summary)
    if args.record:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n## round_overhead.py: {args.label or run.name} "
                    f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()})\n\n"
                    f"`python benchmarks/round_overhead.py "
                    f"{'--analyze ' + str(run) if args.analyze else '--config ' + args.config}`"
                    f"\n\n{table.replace('## ', '### ', 1)}\n{summary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
