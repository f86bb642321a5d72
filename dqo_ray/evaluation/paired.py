"""Side-by-side comparison of runs (pure; matplotlib's object API, no display): each run's
start and final accuracy, one markdown table and one bar plot; per-problem scores of a
checkpoint (the evaluator's predictions files) and paired gains with confidence intervals."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dqo_ray.evaluation.report import round_rows
from dqo_ray.io import atomic_write, read_jsonl

METRICS = (("greedy_acc", "greedy"), ("sample_acc", "mean sample"))


def comparison_rows(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per run and dataset: start and final value of each metric (None where not measured)."""
    out = []
    for name, results in runs.items():
        rounds = round_rows(results)
        if not rounds:
            continue
        start, final = rounds[0][1], rounds[-1][1]
        for dataset in dict.fromkeys(str(r.get("dataset")) for r in results):
            row: dict[str, Any] = {"run": name, "dataset": dataset,
                                   "n": final.rows.get(dataset, {}).get("n")}
            for key, _ in METRICS:
                row[f"start_{key}"] = start.rows.get(dataset, {}).get(key)
                row[f"final_{key}"] = final.rows.get(dataset, {}).get(key)
            out.append(row)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["run", "dataset", "n"]
    for _, label in METRICS:
        header += [f"start {label}", f"final {label}", "change"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- | " + "---: | " * (len(header) - 2)]
    for row in rows:
        cells = [row["run"], row["dataset"], str(row["n"])]
        for key, _ in METRICS:
            start, final = row[f"start_{key}"], row[f"final_{key}"]
            change = "-" if start is None or final is None else f"{100 * (final - start):+.1f}"
            cells += [_pct(start), _pct(final), change]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(out_dir: str | os.PathLike,
                     runs: Mapping[str, Sequence[Mapping[str, Any]]],
                     title: str) -> tuple[Path, Path]:
    """out_dir/compare.md and compare.png, replaced atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs)
    text = (f"# {title}\n\nAccuracy (%) on held-out problems before (start) and after the "
            f"last round; change in points.\n\n{comparison_table(rows)}\n")
    md, png = out_dir / "compare.md", out_dir / "compare.png"
    atomic_write(md, text)

    def plot(f) -> None:
        fig = Figure(figsize=(8, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(METRICS), sharey=True)
        for ax, (key, label) in zip(axes, METRICS, strict=True):
            names = [f"{r['run']}\n{r['dataset']}" for r in rows]
            finals = [100 * (r[f"final_{key}"] or 0) for r in rows]
            starts = [100 * (r[f"start_{key}"] or 0) for r in rows]
            ax.bar(range(len(rows)), finals, color="tab:blue", label="final")
            ax.scatter(range(len(rows)), starts, color="black", marker="_", s=400,
                       label="start", zorder=3)
            ax.set_xticks(range(len(rows)), names, fontsize=8)
            ax.set_title(label)
            ax.grid(axis="y", alpha=0.3)
        axes[0].set_ylabel("accuracy (%)")
        axes[0].legend(loc="lower left")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(f, format="png")

    atomic_write(png, plot)
    return md, png


# --------------------------------------------------------------------------------------------
# Per-problem scores and paired gains
# --------------------------------------------------------------------------------------------

def problem_scores(run_dir: str | os.PathLike, dataset: str,
                   step: int | None = None) -> dict[str, tuple[float, float]]:
    """problem_id -> (greedy correct 0/1, mean of the sampled answers' correctness) at `step`
    (None = the last evaluated step), read from the evaluator's predictions file."""
    folder = Path(run_dir) / "predictions"
    files = sorted(folder.glob(f"{dataset}-step*.jsonl"))
    if step is not None:
        files = [f for f in files if f.name == f"{dataset}-step{step:07d}.jsonl"]
    if not files:
        raise FileNotFoundError(f"{folder}: no predictions for dataset {dataset!r}"
                                + ("" if step is None else f" at step {step}"))
    scores = {}
    for row in read_jsonl(files[-1]):
        samples = row["samples_correct"]
        scores[row["problem_id"]] = (float(row["correct"]),
                                     sum(samples) / len(samples) if samples else math.nan)
    return scores


@dataclass(frozen=True)
class PairedGain:
    """Mean of per-problem differences (final - start) with its normal 95% interval, in
    accuracy points (x100)."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_gain(differences: Sequence[float]) -> PairedGain:
    """The mean of per-problem differences and its 95% interval (1.96 standard errors): the
    same problems scored twice, so each problem's difficulty cancels out of the comparison."""
    n = len(differences)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 problems, got {n}")
    mean = sum(differences) / n
    var = sum((d - mean) ** 2 for d in differences) / (n - 1)
    half = 1.96 * math.sqrt(var / n)
    return PairedGain(100 * mean, 100 * (mean - half), 100 * (mean + half), n)


def gain_differences(pairs: Sequence[tuple[Mapping[str, tuple[float, float]],
                                          Mapping[str, tuple[float, float]]]],
                     metric: int = 0) -> list[float]:
    """Per problem, the mean over (before, after) pairs (one per seed) of after - before, for
    metric 0 (greedy) or 1 (mean sample). Only problems scored in every mapping count."""
    common = set.intersection(*(set(m) for pair in pairs for m in pair))
    return [sum(after[p][metric] - before[p][metric] for before, after in pairs) / len(pairs)
            for p in sorted(common)]
