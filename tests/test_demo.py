"""The demo's path, reduced: tinymath, a small warm start, one DQO round, in-process driver on
the shared Ray instance. Asserts the artefacts and that accuracy is measured (not that it
improved: that is benchmarks/learning.py's job). Plus the comparison table and the paired
gains the benchmark reports (pure)."""

import json
import math
from pathlib import Path

import pytest

from dqo_ray.config import load_config, to_dict
from dqo_ray.evaluation.paired import (
    comparison_rows,
    comparison_table,
    gain_differences,
    paired_gain,
    problem_scores,
    write_comparison,
)
from dqo_ray.run_state import RunState
from jobs import pipeline

REDUCED = [
    "trainer.max_steps=3", "trainer.checkpoint_every=3", "trainer.micro_batch_size=8",
    "trainer.warmup_steps=0",
    "task.limit=12", "eval.limit=12", "eval.samples=2", "generation.samples_per_prompt=2",
    "generation.max_new_tokens=48", "eval.max_new_tokens=48", "generation.chunk_prompts=6",
    "model.tiny_hidden_size=64", "model.tiny_heads=2", "model.tiny_layers=2",
    "pipeline.rounds=1", "pipeline.warm_start.problems=40", "pipeline.warm_start.steps=20",
    "pipeline.warm_start.batch_size=8", "pipeline.warm_start.warmup_steps=2",
    "pipeline.warm_start.threads=1", "run.tensorboard=false",
    # A 20-step start has no prompt with mixed outcomes, which balanced groups need (those
    # are tested through Ray Data in test_train_ray.py).
    "data.prompt_groups=all",
    # The two-node recipe's placement: Ray Train's STRICT_PACK group, placed before the engines
    # start (on one node here, where it is trivially satisfied).
    "trainer.placement=strict_pack",
]
DIAGNOSTICS = ("value_explained_var", "entropy", "kl_full", "kl_k3", "mixed_prompt_frac")


@pytest.mark.ray
def test_reduced_demo_end_to_end(ray_address, tmp_path, capsys):
    def overrides(name: str) -> list[str]:
        return [*REDUCED, f"run.output_dir={tmp_path}", f"run.name={name}",
                f"data.store={tmp_path}/{name}/store", f"ray.address={ray_address}"]

    args = ["--config", "configs/demo.yaml", *(a for o in overrides("demo") for a in ("--set", o))]
    assert pipeline.main(args) == 0
    stages = json.loads((tmp_path / "demo" / "pipeline_state.json").read_text())["stages"]
    run_dir = tmp_path / "demo"
    warm = stages["start/warm"]["result"]
    assert warm["examples"] == 40 and warm["steps"] == 20 and not warm["cached"]
    assert warm["final_loss"] < warm["first_loss"]
    assert warm["policy"].startswith(str(tmp_path / "cache"))  # output_dir/cache
    assert stages["round0/data"]["result"]["policy"] == warm["policy"]  # sampled from it
    assert stages["round0/data"]["result"]["samples"] == 12 * 2

    results = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [(r["round"], r["step"]) for r in results] == [(None, 0), (0, 3)]
    for row in results:  # measured on the 12 held-out problems, greedy and sampled
        assert row["dataset"] == "tinymath" and row["n"] == 12
        assert 0.0 <= row["greedy_acc"] <= 1.0 and 0.0 <= row["sample_acc"] <= 1.0
    predictions = (run_dir / "predictions" / "tinymath-step0000003.jsonl").read_text()
    assert len(predictions.splitlines()) == 12
    metrics = [json.loads(line) for line in
               (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3]  # log_every 10: the checkpoint step only
    for m in metrics:  # what tells a user whether DQO learns, logged and finite
        assert all(math.isfinite(m[key]) for key in DIAGNOSTICS), m
        assert 0 <= m["mixed_prompt_frac"] <= 1 and m["kl_full"] >= 0 and m["entropy"] > 0
    report = (run_dir / "report.md").read_text()
    assert "## Rounds" in report and "| start | 0 |" in report and "| round 0 | 3 |" in report
    assert "Where the rounds' time went" in report  # pipeline.md's round costs
    assert (run_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| start | 0 |" in printed and "| round 0 | 3 |" in printed

    # A second demo run (another name, same inputs) starts from the cached warm start: its
    # start stage (tiny model built again, then the warm start) trains nothing.
    cfg = load_config("configs/demo.yaml", overrides("demo-again"))
    state = RunState(cfg.run.run_dir, to_dict(cfg))
    assert pipeline.Pipeline(cfg, state).start_policy() == warm["policy"]
    again = state.finished("start/warm")
    assert again["cached"] and again["final_loss"] == warm["final_loss"]


def test_comparison_table_and_plot(tmp_path):
    def rows(final_greedy: float) -> list[dict]:
        return [{"checkpoint": "warm", "step": 0, "round": None, "dataset": "tinymath",
                 "n": 10, "greedy_acc": 0.3, "sample_acc": 0.2},
                {"checkpoint": "r1", "step": 8, "round": 1, "dataset": "tinymath", "n": 10,
                 "greedy_acc": final_greedy, "sample_acc": 0.35}]

    runs = {"dqo": rows(0.4), "gold control": rows(0.3)}
    table = comparison_table(comparison_rows(runs)).splitlines()
    assert table[2] == "| dqo | tinymath | 10 | 30.0 | 40.0 | +10.0 | 20.0 | 35.0 | +15.0 |"
    assert table[3].startswith("| gold control | tinymath | 10 | 30.0 | 30.0 | +0.0 |")
    md, png = write_comparison(tmp_path, runs, title="t")
    assert "| dqo |" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"


def test_problem_scores_and_paired_gains(tmp_path):
    def predictions(run: str, step: int, greedy: list[bool], samples: list[list[bool]]) -> Path:
        folder = tmp_path / run / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"tinymath-step{step:07d}.jsonl", "w") as f:
            for i, (g, s) in enumerate(zip(greedy, samples, strict=True)):
                f.write(json.dumps({"problem_id": f"p{i}", "gold": "1", "greedy": "",
                                    "correct": g, "samples_correct": s}) + "\n")
        return tmp_path / run

    run = predictions("a", 0, [False, True, False], [[False, False], [True, False], [False] * 2])
    predictions("a", 60, [True, True, False], [[True, False], [True, True], [False, False]])
    start, final = problem_scores(run, "tinymath", 0), problem_scores(run, "tinymath")
    assert start == {"p0": (0.0, 0.0), "p1": (1.0, 0.5), "p2": (0.0, 0.0)}
    assert final["p0"] == (1.0, 0.5)  # the last step by default
    assert gain_differences([(start, final)], 0) == [1.0, 0.0, 0.0]
    assert gain_differences([(start, final)], 1) == [0.5, 0.5, 0.0]
    assert gain_differences([(start, final), (final, final)], 0) == [0.5, 0.0, 0.0]
    gain = paired_gain([1.0, 0.0, 0.0])
    half = 1.96 * math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 2 / 3)
    assert gain.n == 3 and gain.mean == pytest.approx(100 / 3)
    assert (gain.low, gain.high) == pytest.approx((100 * (1 / 3 - half), 100 * (1 / 3 + half)))
    assert str(paired_gain([0.1, 0.1])) == "+10.0 [+10.0, +10.0]"
    with pytest.raises(FileNotFoundError, match="no predictions for dataset 'gsm8k'"):
        problem_scores(run, "gsm8k")
    with pytest.raises(ValueError, match="at least 2 problems"):
        paired_gain([0.5])
