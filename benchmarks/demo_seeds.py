"""The demo's acceptance measurement: DQO against its start and against the gold-continuation
control, on >= 1000 held-out problems, over several seeds.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--eval-limit 1000] [--config configs/demo.yaml]

Per seed: the demo pipeline (run.seed = seed: another tiny-model init, warm start, sampling)
and the control (supervised training continued on the warm-start gold set for the same
budget), both scored on the same eval.limit test problems. Prints a table per seed and the
mean, checks the acceptance bar (DQO final greedy >= start + 5 points, mean-sample >= start
+ 8, control gains less than DQO) and appends the table to benchmarks/RESULTS.md.
Runs resume: a finished seed is read back, not re-run.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import statistics
import time
from pathlib import Path

from dqo_ray.config import load_config
from dqo_ray.evaluation import read_results
from dqo_ray.evaluation.compare import comparison_rows, comparison_table
from dqo_ray.runtime import init_ray
from jobs.compare import compare

RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows, began = [], time.perf_counter()
    for seed in args.seeds:
        cfg = load_config(args.config, [f"run.seed={seed}", f"run.name=demo-seeds/seed{seed}",
                                        f"eval.limit={args.eval_limit}", "compare.algos=[dqo]",
                                        "compare.gold_control=true", *args.overrides])
        init_ray(cfg.ray)
        out = compare(cfg)
        runs = {name: read_results(out.parent / f"seed{seed}-{suffix}")
                for name, suffix in (("dqo", "dqo"), ("gold control", "gold-control"))}
        for row in comparison_rows(runs):
            rows.append({**row, "run": f"{row['run']} (seed {seed})", "seed": seed,
                         "kind": row["run"]})
    table = comparison_table(rows)
    mean = {}
    for kind in ("dqo", "gold control"):
        mine = [r for r in rows if r["kind"] == kind]
        mean[kind] = {k: statistics.mean(r[k] for r in mine) for k in
                      ("start_greedy_acc", "final_greedy_acc", "start_sample_acc",
                       "final_sample_acc")}
    gain = {kind: {"greedy": 100 * (m["final_greedy_acc"] - m["start_greedy_acc"]),
                   "sample": 100 * (m["final_sample_acc"] - m["start_sample_acc"])}
            for kind, m in mean.items()}
    verdict = {
        "DQO greedy >= start + 5": gain["dqo"]["greedy"] >= 5,
        "DQO mean-sample >= start + 8": gain["dqo"]["sample"] >= 8,
        "control gains less than DQO (greedy and mean-sample)":
            gain["gold control"]["greedy"] < gain["dqo"]["greedy"]
            and gain["gold control"]["sample"] < gain["dqo"]["sample"],
    }
    summary = "\n".join([
        f"Mean over seeds {args.seeds} ({args.eval_limit} held-out problems): DQO "
        f"{gain['dqo']['greedy']:+.1f} greedy / {gain['dqo']['sample']:+.1f} mean-sample points; "
        f"gold control {gain['gold control']['greedy']:+.1f} / "
        f"{gain['gold control']['sample']:+.1f}.",
        *(f"- {name}: {'yes' if ok else 'NO'}" for name, ok in verdict.items())])
    print(table)
    print(summary)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with open(RESULTS, "a") as f:
        f.write(f"\n## demo_seeds ({stamp}, {platform.node()}, {platform.processor() or 'cpu'}, "
                f"{args.config}, {time.perf_counter() - began:.0f}s)\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
