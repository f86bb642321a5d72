"""Where a pipeline's rounds spend their time, from the run's own records (pure: no Ray).

Inputs: pipeline_state.json's stages (each with `finished_at` and `seconds`, so its start is
known) and rank 0's metrics lines (each with `time`, `round`, `step`, `steps_per_s`: a line
closes a window of steps, and the window's length is steps / steps_per_s). Per round:

    sampling     its data stage (round r+1 runs beside round r's training when overlapped)
    exposed      the part of it no training ran beside (what the critical path waits for)
    reference    its reference stage (the Ray Data stage: ingested data; else ~0)
    start        from the train stage's start to its first optimizer step (worker group
                 start, model loads, DeepSpeed init, the first batch of the epoch: what one
                 run for all rounds removes after the first)
    steps        optimizer step time (the work; waits for batches left out)
    other        the rest of the train stage (checkpoint writes and uploads, report barriers,
                 a run's teardown)
    refresh      the engines' weight refresh before the round's data is sampled

Overhead = (wall time after round 0's sampling - step time) / that wall time, the number the
round-speed work is judged by; `overhead_excl_sampling` also leaves out exposed sampling.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

COLUMNS = ["round", "sampling", "exposed", "reference", "start", "steps", "checkpoint",
           "other", "refresh"]


def _span(stage: Mapping[str, Any]) -> tuple[float, float]:
    return stage["finished_at"] - stage["seconds"], stage["finished_at"]


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def step_windows(metrics: Iterable[Mapping[str, Any]]
                 ) -> dict[int, list[tuple[float, float, float]]]:
    """round -> [(window start, window end, data wait)] of optimizer steps, from rank 0's
    lines. A line's window lasts `step_s` (older runs: its steps since the last line /
    steps_per_s, their steps counted from 1 in each round), ends before the line's checkpoint
    was written, and spent `data_wait_frac` of itself waiting for batches."""
    out: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    last_step: dict[int, int] = {}
    for line in metrics:
        if "steps_per_s" not in line or "time" not in line:
            continue
        r, step = int(line.get("round", 0)), int(line["step"])
        seconds = line.get("step_s", (step - last_step.get(r, 0)) / line["steps_per_s"])
        last_step[r] = step
        end = line["time"] - line.get("checkpoint_s", 0.0)
        out[r].append((end - seconds, end, seconds * line.get("data_wait_frac", 0.0)))
    return out


def round_breakdown(stages: Mapping[str, Mapping[str, Any]],
                    metrics: Iterable[Mapping[str, Any]],
                    refresh_s: Mapping[int, float] | None = None) -> dict[str, Any]:
    """Per-round costs (seconds) and the run's totals; see the module docstring. `refresh_s`:
    round -> refresh seconds, when the state does not record them (older runs' logs do)."""
    metrics = list(metrics)
    windows = step_windows(metrics)
    checkpoints: dict[int, float] = defaultdict(float)
    for line in metrics:
        checkpoints[int(line.get("round", 0))] += line.get("checkpoint_s", 0.0)
    rounds = sorted(int(k.split("/")[0].removeprefix("round")) for k in stages
                    if k.startswith("round") and k.endswith("/train"))
    rows = []
    for r in rounds:
        train = _span(stages[f"round{r}/train"])
        data = stages.get(f"round{r}/data")
        sampling = data["seconds"] if data else 0.0
        # Exposed: the sampling that ran beside no training (round r+1 beside round r).
        beside = (_overlap(_span(data), _span(stages[f"round{r - 1}/train"]))
                  if data and f"round{r - 1}/train" in stages else 0.0)
        spans = windows.get(r, [])
        steps = sum(b - a - wait for a, b, wait in spans)  # waits for data are not work
        # To the first step: the round's start, then its first batch (the epoch's build).
        start = max(0.0, spans[0][0] - train[0]) + spans[0][2] if spans else train[1] - train[0]
        checkpoint = checkpoints.get(r, 0.0)
        refresh = (data or {}).get("result", {}).get("refresh_s")
        if refresh is None:
            refresh = (refresh_s or {}).get(r, 0.0)
        rows.append({"round": r, "sampling": sampling, "exposed": max(0.0, sampling - beside),
                     "reference": stages.get(f"round{r}/reference", {}).get("seconds", 0.0),
                     "start": start, "steps": steps, "checkpoint": checkpoint,
                     "other": max(0.0, train[1] - train[0] - start - steps - checkpoint),
                     "refresh": refresh})
    if not rows:
        return {"rounds": [], "wall": 0.0, "steps": 0.0, "overhead": 0.0,
                "overhead_excl_sampling": 0.0}
    after = _span(stages["round0/data"])[1] if "round0/data" in stages else _span(
        stages["round0/train"])[0]
    end = max(s["finished_at"] for s in stages.values())
    wall = end - after
    steps = sum(row["steps"] for row in rows)
    exposed = sum(row["exposed"] for row in rows[1:])
    # The wait at the end: each round's evaluate stage records the time waited so far.
    evaluation = max((s["seconds"] for k, s in stages.items() if k.endswith("/evaluate")
                      and k.startswith("round")), default=0.0)
    return {"rounds": rows, "wall": wall, "steps": steps, "eval_wait": evaluation,
            "exposed_sampling": exposed,
            "overhead": (wall - steps) / wall if wall > 0 else 0.0,
            "overhead_excl_sampling": (wall - steps - exposed) / wall if wall > 0 else 0.0}


def breakdown_markdown(costs: Mapping[str, Any]) -> str:
    """The per-round table and the overhead line (report.md, the benchmark)."""
    if not costs["rounds"]:
        return ""
    lines = ["## Where the rounds' time went (seconds)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " ---: |" * len(COLUMNS)]
    for row in costs["rounds"]:
        lines.append("| " + " | ".join(str(row["round"]) if c == "round" else
                                       f"{row[c]:.1f}" for c in COLUMNS) + " |")
    lines += ["", f"After round 0's sampling the rounds took {costs['wall']:.0f} s of wall time, "
              f"{costs['steps']:.0f} s of them optimizer steps: overhead "
              f"{100 * costs['overhead']:.0f}% ({100 * costs['overhead_excl_sampling']:.0f}% "
              f"leaving out {costs['exposed_sampling']:.0f} s of sampling no training ran beside"
              f"); the end waited {costs['eval_wait']:.0f} s for the evaluator."]
    return "\n".join(lines) + "\n"
