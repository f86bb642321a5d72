"""Evaluation results on disk and the human-readable report built from them.

- `run_dir/results.jsonl`: one JSON row per (checkpoint x dataset), appended as each
  evaluation finishes: {"checkpoint", "step", "round", "dataset", "time" (unix),
  "eval_seconds", then the `summarize` fields: "n", "greedy_acc", "sample_acc", "maj@k",
  "pass@k", "by_subject", "by_level"}. Append-only, so a crash loses at most the row being
  written, and readers skip such a cut-off line.
- `run_dir/report.md`: a table of accuracy (%) per checkpoint and dataset, the best per column
  starred, then MATH breakdowns by subject and level for the latest checkpoint.
- `run_dir/accuracy.png`: accuracy against training step (or round), one line per dataset.

Both report files are rebuilt from the whole results file each time and replaced atomically,
so a reader never sees half a report. No Ray, no models.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from dqo_ray.capacity import NODES_FILE
from dqo_ray.evaluation.round_costs import breakdown_markdown, round_breakdown
from dqo_ray.io import append_jsonl, atomic_write, read_jsonl

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.md"
PLOT_FILE = "accuracy.png"
PLOT_SIZE_IN = (8.0, 4.5)
PLOT_DPI = 100
"""accuracy.png is PLOT_SIZE_IN * PLOT_DPI = 800 x 450 pixels."""

_SAMPLE_METRIC = re.compile(r"(maj|pass)@(\d+)")

# --------------------------------------------------------------------------------------------
# results.jsonl
# --------------------------------------------------------------------------------------------


def result_row(checkpoint: str, dataset: str, summary: Mapping[str, Any], *, step: int,
               round: int | None = None, eval_seconds: float,
               time: float | None = None) -> dict[str, Any]:
    """A results.jsonl row: the identifying fields first, then the `summarize` output."""
    return {"checkpoint": str(checkpoint), "step": step, "round": round, "dataset": dataset,
            "time": _time.time() if time is None else time, "eval_seconds": eval_seconds,
            **summary}


def append_result(run_dir: str | os.PathLike, row: Mapping[str, Any]) -> Path:
    """Appends one row to run_dir/results.jsonl, durably (`dqo_ray.io.append_jsonl`)."""
    for key in ("checkpoint", "dataset"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise ValueError(f"a results row needs a non-empty string {key!r}, got {row!r}")
    return append_jsonl(Path(run_dir) / RESULTS_FILE, row)


def read_results(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of run_dir/results.jsonl in file order ([] when there is none yet); a line
    cut short by a crash is skipped with a warning (`dqo_ray.io.read_jsonl`)."""
    return read_jsonl(Path(run_dir) / RESULTS_FILE)


# --------------------------------------------------------------------------------------------
# Checkpoints x datasets
# --------------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    name: str
    step: int | None
    round: int | None
    first_seen: int
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # dataset -> its row

    def order(self) -> tuple[float, float, int]:
        # By round, then step; a checkpoint without them (e.g. the base model) goes first.
        return (-math.inf if self.round is None else self.round,
                -math.inf if self.step is None else self.step, self.first_seen)


def _checkpoints(results: Sequence[Mapping[str, Any]]) -> list[_Checkpoint]:
    """Rows grouped by checkpoint, in (round, step) order. A (checkpoint, dataset) evaluated
    twice (e.g. again after a resume) keeps its last row."""
    by_name: dict[str, _Checkpoint] = {}
    for row in results:
        name = str(row.get("checkpoint"))
        ckpt = by_name.setdefault(name, _Checkpoint(name, None, None, len(by_name)))
        if row.get("step") is not None:
            ckpt.step = int(row["step"])
        if row.get("round") is not None:
            ckpt.round = int(row["round"])
        ckpt.rows[str(row.get("dataset"))] = dict(row)
    return sorted(by_name.values(), key=_Checkpoint.order)


def _datasets(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Datasets in order of first appearance (the config's order, as the evaluator runs it)."""
    return list(dict.fromkeys(str(row.get("dataset")) for row in results))


@dataclass(frozen=True)
class _Column:
    dataset: str
    metric: str  # a row key: "greedy_acc", "sample_acc", "maj@8", "pass@8"

    @property
    def header(self) -> str:
        if self.metric == "greedy_acc":
            return self.dataset
        return f"{self.dataset} {'sample' if self.metric == 'sample_acc' else self.metric}"


def _columns(checkpoints: Sequence[_Checkpoint], datasets: Sequence[str]) -> list[_Column]:
    columns = []
    for ds in datasets:
        rows = [c.rows[ds] for c in checkpoints if ds in c.rows]
        columns.append(_Column(ds, "greedy_acc"))
        if any(r.get("sample_acc") is not None for r in rows):
            columns.append(_Column(ds, "sample_acc"))
        sampled = {key for r in rows for key in r if _SAMPLE_METRIC.fullmatch(key)}
        for key in sorted(sampled, key=lambda k: (int(_SAMPLE_METRIC.fullmatch(k)[2]), k)):
            columns.append(_Column(ds, key))
    return columns


def _value(ckpt: _Checkpoint, column: _Column) -> float | None:
    value = ckpt.rows.get(column.dataset, {}).get(column.metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None  # missing, or not a number (a hand-edited row)
    return float(value)


# --------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cell(text: Any) -> str:
    # Names are free text: a `|` would split the markdown cell.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(map(_cell, header)) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _main_table(checkpoints: Sequence[_Checkpoint], columns: Sequence[_Column]) -> list[str]:
    show_round = any(c.round is not None for c in checkpoints)
    show_step = any(c.step is not None for c in checkpoints)
    header = ["checkpoint", *(["round"] if show_round else []), *(["step"] if show_step else []),
              *(col.header for col in columns)]
    # Stars only where they tell something: two or more values in the column, not all equal.
    # Ties for the best are all starred.
    best: dict[_Column, float | None] = {}
    for col in columns:
        values = [v for c in checkpoints if (v := _value(c, col)) is not None]
        best[col] = max(values) if len(set(values)) >= 2 else None
    rows = []
    for ckpt in checkpoints:
        row = [f"`{_cell(ckpt.name)}`"]
        if show_round:
            row.append("-" if ckpt.round is None else str(ckpt.round))
        if show_step:
            row.append("-" if ckpt.step is None else str(ckpt.step))
        for col in columns:
            value = _value(ckpt, col)
            text = _pct(value)
            row.append(f"**{text}** ★" if value is not None and value == best[col] else text)
        rows.append(row)
    return _table(header, rows)


def _breakdowns(checkpoints: Sequence[_Checkpoint], datasets: Sequence[str]) -> list[str]:
    """Per dataset with a breakdown (MATH): by subject and by level, latest checkpoint, next
    to the first checkpoint's numbers when there is an earlier one to compare with."""
    lines: list[str] = []
    for ds in datasets:
        for key, label in (("by_subject", "subject"), ("by_level", "level")):
            having = [c for c in checkpoints if isinstance(c.rows.get(ds, {}).get(key), dict)]
            if not having:
                continue
            latest, first = having[-1], having[0]
            shown = [first, latest] if first is not latest else [latest]
            groups: dict[str, Any] = latest.rows[ds][key]
            lines += ["", f"### {ds} by {label}", ""]
            header = [label, "n", *(f"`{c.name}`" for c in shown)]
            rows = []
            for name, stats in groups.items():
                row = [_cell(name), str(stats.get("n", "-"))]
                for c in shown:
                    row.append(_pct(c.rows[ds][key].get(name, {}).get("greedy_acc")))
                rows.append(row)
            lines += _table(header, rows)
    if lines:
        lines = ["", "## Breakdowns (greedy accuracy, %)", *lines]
    return lines


def round_rows(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, _Checkpoint]]:
    """A pipeline's checkpoints as its rounds: ("start", the checkpoint evaluated without a
    round), then ("round r", the last evaluated checkpoint of round r), in order."""
    rows: list[tuple[str, _Checkpoint]] = []
    for ckpt in _checkpoints(results):
        label = "start" if ckpt.round is None else f"round {ckpt.round}"
        if rows and rows[-1][0] == label:
            rows[-1] = (label, ckpt)  # later in the same round: keep the last
        else:
            rows.append((label, ckpt))
    return rows


def round_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Greedy and mean-sample accuracy (%) of the start and of each round, one line each, as
    a markdown table (also readable printed on a terminal)."""
    rows = round_rows(results)
    if not rows:
        return "No evaluation results."
    checkpoints = [c for _, c in rows]
    columns = [c for c in _columns(checkpoints, _datasets(results))
               if c.metric in ("greedy_acc", "sample_acc")]
    first = checkpoints[0]
    body = []
    for label, ckpt in rows:
        cells = [label, "-" if ckpt.step is None else str(ckpt.step)]
        for col in columns:
            value, base = _value(ckpt, col), _value(first, col)
            delta = "" if ckpt is first or value is None or base is None else \
                f" ({100 * (value - base):+.1f})"
            cells.append(_pct(value) + delta)
        body.append(cells)
    n = ", ".join(f"{ds} n={next((c.rows[ds].get('n') for c in checkpoints if ds in c.rows), '?')}"
                  for ds in _datasets(results))
    return "\n".join([*_table(["", "step", *(c.header for c in columns)], body),
                      f"Accuracy (%) on held-out problems ({n}); (+x) = change from the first row."])


def _markdown(title: str, results: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"# {title}", ""]
    if not results:
        return "\n".join([*lines, "No evaluation results yet.", ""])
    checkpoints = _checkpoints(results)
    datasets = _datasets(results)
    columns = _columns(checkpoints, datasets)
    lines += [
        "Accuracy (%) per checkpoint. A dataset's own column is greedy decoding; `sample` is",
        "the mean accuracy of the sampled answers, `maj@k` the majority vote of k samples and",
        "`pass@k` the unbiased chance that k samples include a correct one. ★ marks the best",
        "checkpoint in each column (ties: all of them).",
        "",
        *_main_table(checkpoints, columns),
        "",
    ]
    sizes = []
    for ds in datasets:
        n = next((c.rows[ds].get("n") for c in reversed(checkpoints) if ds in c.rows), None)
        sizes.append(f"{ds} {n if n is not None else '?'}")
    latest = max((float(r["time"]) for r in results if isinstance(r.get("time"), int | float)),
                 default=None)
    lines.append(f"Problems per dataset: {', '.join(sizes)}.")
    if latest is not None:
        stamp = datetime.fromtimestamp(latest, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines.append(f"Latest evaluation: {stamp}.")
    lines += _breakdowns(checkpoints, datasets)
    return "\n".join(lines) + "\n"


PIPELINE_FILE = "pipeline.md"
"""Written by the pipeline job (stages, timings, per-round table); report.md includes it."""


def write_pipeline_summary(run_dir: Path, stages: Mapping[str, Mapping[str, Any]],
                           overlap: Sequence[str]) -> Path:
    """run_dir/pipeline.md: the stages with their timings and counts, and where the rounds'
    time went (report.md includes it)."""
    lines = ["## Pipeline stages", "", "| stage | seconds | attempt | result |",
             "| --- | ---: | ---: | --- |"]
    for stage, record in stages.items():
        result = {k: v for k, v in record["result"].items() if k not in ("metrics", "started")}
        text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in result.items())
        lines.append(f"| {stage} | {record['seconds']:.1f} | {record['attempt']} | {text} |")
    if overlap:
        lines += ["", "Overlap: " + "; ".join(overlap) + "."]
    costs = round_breakdown(stages, read_jsonl(run_dir / "train_metrics.jsonl"))
    if costs["rounds"]:
        lines += ["", breakdown_markdown(costs).replace("## ", "### ", 1)]
    lines += _nodes_table(read_jsonl(run_dir / NODES_FILE))
    return atomic_write(run_dir / PIPELINE_FILE, "\n".join(lines) + "\n", what="the report")


def _nodes_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the autoscaler was asked for and the nodes that came and went (capacity watch),
    in seconds after the first record; nothing when the cluster never changed."""
    if not any(r["event"] in ("requested", "came", "left") for r in records):
        return []
    start = records[0]["time"]
    lines = ["", "## Nodes", "", "| after | event | node | resources |", "| ---: | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['time'] - start:.0f}s | {r['event']} | {r.get('node', '')} | "
                     f"{r.get('resources') or r.get('what', '')} |")
    return lines


# --------------------------------------------------------------------------------------------
# accuracy.png
# --------------------------------------------------------------------------------------------


def _x_axis(checkpoints: Sequence[_Checkpoint]) -> tuple[list[float], str, bool]:
    """(x per checkpoint, axis label, whether x is a plain index labelled by names)."""
    for attr, label in (("step", "training step"), ("round", "round")):
        xs = [getattr(c, attr) for c in checkpoints]
        if xs and None not in xs and len(set(xs)) == len(xs):
            return [float(x) for x in xs], label, False
    return [float(i) for i in range(len(checkpoints))], "checkpoint", True


def _plot(title: str, results: Sequence[Mapping[str, Any]], out: IO[bytes]) -> None:
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed,
    # safe in an actor's threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    checkpoints = _checkpoints(results)
    xs, xlabel, by_index = _x_axis(checkpoints)
    top = 0.0
    for i, ds in enumerate(_datasets(results)):
        for metric, style, label in (("greedy_acc", "-", "greedy"), ("sample_acc", "--", "sample")):
            col = _Column(ds, metric)
            points = [(x, 100 * v) for x, c in zip(xs, checkpoints, strict=True)
                      if (v := _value(c, col)) is not None]
            top = max([top, *(y for _, y in points)])
            if points:
                ax.plot(*zip(*points, strict=True), linestyle=style, marker="o", markersize=4,
                        color=f"C{i % 10}", label=f"{ds} {label}")
    if by_index:
        ax.set_xticks(xs, [c.name for c in checkpoints], rotation=30, ha="right", fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.has_data():
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    # Accuracy lives in [0, 100]: start at 0 (never a negative axis for an all-zero run) and
    # leave headroom above the best value without flattening small numbers.
    ax.set_ylim(0, min(100.0, max(10.0, top * 1.15)) + 0.5)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------



def write_report(run_dir: str | os.PathLike,
                 results: Sequence[Mapping[str, Any]] | None = None, *,
                 title: str | None = None) -> tuple[Path, Path]:
    """Writes run_dir/report.md and run_dir/accuracy.png from `results` (default: the rows of
    run_dir/results.jsonl); returns their paths. Works from zero rows up."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = list(read_results(run_dir) if results is None else results)
    title = title or f"Evaluation: {run_dir.resolve().name}"
    report, plot = run_dir / REPORT_FILE, run_dir / PLOT_FILE
    text = _markdown(title, rows)
    if any(r.get("round") is not None for r in rows):
        text += "\n## Rounds\n\n" + round_table(rows) + "\n"
    if (run_dir / PIPELINE_FILE).exists():
        text += "\n" + (run_dir / PIPELINE_FILE).read_text()
    data = text.encode()
    atomic_write(report, lambda f: f.write(data), what="the report")
    atomic_write(plot, lambda f: _plot(f"{title}: accuracy per checkpoint", rows, f),
                 what="the report's plot")
    return report, plot
