"""Does DQO teach the model? DQO, RFT and the gold control from the same plateaued warm start
at equal budget, over several seeds, with paired 95% confidence intervals.

    python benchmarks/learning.py [--config configs/learning.yaml] [--seeds 0 1 2]
                                  [--eval-limit 1000] [--extra dro dpo] [--set key=value ...]
                                  [--ablate NAME key=value ... [--ablate ...]]

Per seed (run.seed = seed: another tiny-model init, warm start and sampling): `jobs.compare`
runs DQO and RFT as full pipelines (same prompts, samples, rounds x steps x batch) and the
gold control (supervised training continued on the warm-start gold set for the same steps x
batch); on the first seed also the `--extra` algorithms. Every run scores the same
eval.limit held-out problems at the start and after each round (greedy, and the mean of
eval.samples samples). Gains are paired per problem (final - start on the same problem), the
3-seed gain averages each problem's gain over the seeds; intervals are 1.96 standard errors
over problems (seed-to-seed spread is shown by the per-seed rows).

An ablation (`--ablate kl0 algo.kl_coef=0`) is DQO with those settings changed, run on every
seed from the same warm start as "dqo kl0" and compared with the recipe's DQO problem by
problem: the measurement behind each part of configs/learning.yaml's recipe.

On tinymath it also tables why the greedy answers are wrong at each evaluated step
(`tinymath.error_kind`: no answer line, arithmetic, answer not the last result, wrong steps).

Resumable: every pipeline stage is recorded, so a re-run skips finished runs and continues an
unfinished one. Writes runs/<run.name>/learning.md and learning.png and appends the table to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dqo_ray.config import load_config  # noqa: E402
from dqo_ray.evaluation.paired import gain_differences, paired_gain, problem_scores  # noqa: E402
from dqo_ray.io import atomic_write, read_jsonl  # noqa: E402
from dqo_ray.runtime import ENGINE_LOG, init_ray  # noqa: E402
from dqo_ray.tasks.tinymath import ERROR_KINDS, error_kind  # noqa: E402
from jobs.compare import compare, run_algorithm  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
METRICS = (("greedy", 0), ("mean-sample", 1))
log = logging.getLogger("learning")


def run_seed(config: str, seed: int, algos: list[str], eval_limit: int,
             overrides: list[str], out: Path) -> dict[str, Path]:
    """The comparison for one seed (resumed where it stopped); method -> run folder."""
    # The user's overrides first: run.name, run.seed and the comparison are this script's.
    cfg = load_config(config, [*overrides, f"run.seed={seed}", f"run.name={out.name}/seed{seed}",
                               f"eval.limit={eval_limit}", f"compare.algos=[{','.join(algos)}]",
                               "compare.gold_control=true"])
    init_ray(cfg.ray, out / ENGINE_LOG)
    out = compare(cfg)
    runs = {algo: out.parent / f"seed{seed}-{algo}" for algo in algos}
    runs["gold control"] = out.parent / f"seed{seed}-gold-control"
    return runs


def run_ablation(config: str, seed: int, name: str, changes: list[str], eval_limit: int,
                 overrides: list[str], out: Path) -> Path:
    """DQO with `changes` on top of the recipe, for one seed (resumed where it stopped)."""
    cfg = load_config(config, [*overrides, *changes, f"run.seed={seed}",
                               f"run.name={out.name}/seed{seed}", f"eval.limit={eval_limit}"])
    init_ray(cfg.ray, out / ENGINE_LOG)
    return run_algorithm(cfg, "dqo", label=f"dqo-{name}")


def gains(seeds: dict[int, dict[str, Path]], dataset: str) -> list[dict]:
    """Rows of the table: per method, each seed's paired gain, then the mean over seeds."""
    rows = []
    methods = dict.fromkeys(m for runs in seeds.values() for m in runs)
    for method in methods:
        pairs = {s: (problem_scores(runs[method], dataset, 0),
                     problem_scores(runs[method], dataset))
                 for s, runs in seeds.items() if method in runs}
        for s, pair in pairs.items():
            rows.append(_row(method, f"seed {s}", [pair]))
        if len(pairs) > 1:
            rows.append(_row(method, f"mean of {len(pairs)} seeds", list(pairs.values())))
    return rows


def _row(method: str, seeds: str, pairs: list) -> dict:
    row = {"method": method, "seeds": seeds, "n": len(gain_differences(pairs))}
    for label, metric in METRICS:
        start = sum(sum(v[metric] for v in before.values()) / len(before)
                    for before, _ in pairs) / len(pairs)
        row[f"start {label}"] = 100 * start
        row[f"gain {label}"] = paired_gain(gain_differences(pairs, metric))
    return row


def versus(seeds: dict[int, dict[str, Path]], dataset: str, a: str, b: str) -> dict:
    """a's final minus b's final, per problem, averaged over the seeds both ran."""
    pairs = [(problem_scores(runs[b], dataset), problem_scores(runs[a], dataset))
             for runs in seeds.values() if a in runs and b in runs]
    return {label: paired_gain(gain_differences(pairs, metric)) for label, metric in METRICS}


def table(rows: list[dict]) -> str:
    header = ["method", "seeds", "n", "start greedy", "gain greedy [95% CI]",
              "start mean-sample", "gain mean-sample [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seeds']} | {r['n']} | {r['start greedy']:.1f} | "
                     f"{r['gain greedy']} | {r['start mean-sample']:.1f} | "
                     f"{r['gain mean-sample']} |")
    return "\n".join(lines)


def error_table(seeds: dict[int, dict[str, Path]], dataset: str) -> str:
    """tinymath only: why the greedy answers are wrong at each evaluated step, per 1000
    problems, mean over seeds: which errors a method fixes and which it adds."""
    lines = ["| method | step | correct | " + " | ".join(ERROR_KINDS) + " |",
             "| --- | ---: |" + " ---: |" * (len(ERROR_KINDS) + 1)]
    methods = dict.fromkeys(m for runs in seeds.values() for m in runs)
    for method in methods:
        per_seed = [sorted((Path(runs[method]) / "predictions").glob(f"{dataset}-step*.jsonl"))
                    for runs in seeds.values() if method in runs]
        for i in range(min(map(len, per_seed))):
            counts = dict.fromkeys((None, *ERROR_KINDS), 0.0)
            for files in per_seed:
                rows = read_jsonl(files[i])
                for row in rows:
                    counts[error_kind(row["greedy"], row["gold"])] += 1000 / len(rows)
            step = int(per_seed[0][i].stem.rsplit("step", 1)[1])
            lines.append(f"| {method} | {step} | "
                         + " | ".join(f"{v / len(per_seed):.0f}" for v in counts.values()) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    means = [r for r in rows if r["seeds"].startswith("mean")] or rows
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(METRICS), sharey=True)
    for ax, (label, _) in zip(axes, METRICS, strict=True):
        gains_ = [r[f"gain {label}"] for r in means]
        ax.bar(range(len(means)), [g.mean for g in gains_],
               yerr=[[g.mean - g.low for g in gains_], [g.high - g.mean for g in gains_]],
               color=["tab:green" if g.low > 0 else "tab:gray" for g in gains_], capsize=4)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(means)), [f"{r['method']}\n{r['seeds']}" for r in means],
                      fontsize=8)
        ax.set_title(f"{label} accuracy gain (points)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def verdict(rows: list[dict], vs_rft: dict) -> list[tuple[str, bool | None]]:
    """The issue's acceptance checks on the mean over seeds (none with one seed), after the
    paired DQO - RFT difference (None: a measurement, not a check)."""
    checks: list[tuple[str, bool | None]] = [
        (f"DQO final - RFT final, {m}: {vs_rft[m]}", None) for m, _ in METRICS]
    mean = {r["method"]: r for r in rows if r["seeds"].startswith("mean")}
    if not {"dqo", "rft", "gold control"} <= set(mean):
        return checks
    dqo, rft, gold = mean["dqo"], mean["rft"], mean["gold control"]
    return checks + [
        ("DQO greedy gain >= +4, interval above 0",
         dqo["gain greedy"].mean >= 4 and dqo["gain greedy"].low > 0),
        ("DQO mean-sample gain >= +6, interval above 0",
         dqo["gain mean-sample"].mean >= 6 and dqo["gain mean-sample"].low > 0),
        ("DQO gain >= RFT gain - 1 (both metrics)",
         all(dqo[f"gain {m}"].mean >= rft[f"gain {m}"].mean - 1 for m, _ in METRICS)),
        ("gold control gains less than DQO (both metrics)",
         all(gold[f"gain {m}"].mean < dqo[f"gain {m}"].mean for m, _ in METRICS)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/learning.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--extra", nargs="*", default=["dro", "dpo"],
                        help="algorithms run on the first seed only")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--ablate", nargs="+", action="append", default=[],
                        metavar=("NAME", "KEY=VALUE"),
                        help="DQO with these settings changed, on every seed")
    args = parser.parse_args()
    if any(len(a) < 2 for a in args.ablate):
        parser.error("--ablate needs a name and at least one key=value")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    began = time.perf_counter()
    base = load_config(args.config, args.overrides)
    out = Path(base.run.run_dir).absolute()
    seeds: dict[int, dict[str, Path]] = {}
    for i, seed in enumerate(args.seeds):
        algos = ["dqo", "rft", *(args.extra if i == 0 else [])]
        log.info("[learning] seed %d (%d of %d): %s + gold control", seed, i + 1,
                 len(args.seeds), ", ".join(algos))
        seeds[seed] = run_seed(args.config, seed, algos, args.eval_limit, args.overrides, out)
    for name, *changes in args.ablate:
        for seed in args.seeds:
            log.info("[learning] ablation %s (%s), seed %d", name, " ".join(changes), seed)
            seeds[seed][f"dqo {name}"] = run_ablation(args.config, seed, name, changes,
                                                      args.eval_limit, args.overrides, out)
    dataset = base.eval.datasets[0]
    rows = gains(seeds, dataset)
    vs_rft = versus(seeds, dataset, "dqo", "rft")
    checks = verdict(rows, vs_rft)
    for name, *changes in args.ablate:
        diff = versus(seeds, dataset, f"dqo {name}", "dqo")
        checks += [(f"DQO {name} ({' '.join(changes)}) final - DQO final, {m}: {diff[m]}", None)
                   for m, _ in METRICS]
    text = "\n".join([table(rows), "", *(f"- {c}" if ok is None else
                                         f"- {c}: {'yes' if ok else 'NO'}" for c, ok in checks)])
    if dataset == "tinymath":
        text += ("\n\nGreedy answers by kind, per 1000 problems (mean over seeds):\n\n"
                 + error_table(seeds, dataset))
    print(text)
    title = f"{args.config}: gains over the warm start, {args.eval_limit} held-out problems"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "learning.md", f"# {title}\n\n{text}\n")
    plot(rows, out / "learning.png", title)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with open(RESULTS, "a") as f:
        f.write(f"\n## learning.py ({stamp}, {platform.machine()}, {platform.node()}, "
                f"{args.config}, seeds {args.seeds}, {time.perf_counter() - began:.0f}s)\n\n"
                f"{text}\n")
    print(f"{out / 'learning.md'}, {out / 'learning.png'}")


if __name__ == "__main__":
    main()
