"""Side-by-side comparison of runs (pure; matplotlib's object API, no display): each run's
start and final accuracy, one markdown table and one bar plot."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dqo_ray.evaluation.report import _atomic_write, round_rows

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
    _atomic_write(md, lambda f: f.write(text.encode()))

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

    _atomic_write(png, plot)
    return md, png
