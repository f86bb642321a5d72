"""The evaluator: deterministic greedy scoring, the scoring path proven with gold answers,
and the evaluator actor following a training run on the shared Ray cluster."""

import json
import os
from pathlib import Path

import pytest
import ray
from conftest import repo_data, write_toy_store
from PIL import Image

from actors.engines import Sample
from actors.evaluator import Evaluator, start_evaluator
from dqo_ray.config import load_config
from dqo_ray.data.streams import score_reference
from dqo_ray.models import load_tokenizer
from dqo_ray.tasks import load_problems
from dqo_ray.train.ray_trainer import train_on_store


def eval_config(tmp_path, datasets, limit, **extra):
    sources = {"gsm8k": repo_data("gsm8k"), "math500": repo_data("math"),
               "math": repo_data("math")}
    overrides = [f"run.output_dir={tmp_path}", "run.name=ev", f"eval.datasets=[{datasets}]",
                 f"eval.limit={limit}", "eval.max_new_tokens=16", "generation.kv_cache_gb=0.25"]
    overrides += [f"eval.sources.{d}={sources[d]}" for d in datasets.split(",")]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scoring_twice_gives_identical_greedy_results(tmp_path, tiny_checkpoint):
    cfg = eval_config(tmp_path, "gsm8k", 6, **{"eval.engine": "vllm"})
    evaluator = Evaluator(cfg, str(tiny_checkpoint), cfg.run.run_dir)
    first = evaluator.evaluate(str(tiny_checkpoint), step=1)
    second = evaluator.evaluate(str(tiny_checkpoint), step=2)
    run = Path(cfg.run.run_dir)
    a = read_jsonl(run / "predictions" / "gsm8k-step0000001.jsonl")
    b = read_jsonl(run / "predictions" / "gsm8k-step0000002.jsonl")
    assert len(a) == 6 and a == b
    assert any(p["greedy"] for p in a)  # the model did write something
    assert first[0]["greedy_acc"] == second[0]["greedy_acc"]
    assert [r["step"] for r in read_jsonl(run / "results.jsonl")] == [1, 2]


class GoldAnswerEngine:
    """A fake model (named as such): answers every prompt with the problem's gold worked
    solution. It exists to prove the scoring path end to end, not to be evaluated."""

    name = "gold-answer fake"

    def __init__(self, solutions: dict[tuple[int, ...], str]) -> None:
        self.solutions = solutions

    def generate(self, prompts, spec):
        return [[Sample([0], self.solutions[tuple(p)], "stop", [0.0]) for _ in range(spec.n)]
                for p in prompts]

    def load_weights(self, checkpoint_dir):
        pass


def test_gold_answers_score_100_percent(tmp_path, tiny_checkpoint):
    cfg = eval_config(tmp_path, "gsm8k,math500", 40, **{"eval.samples": 3})
    evaluator = Evaluator(cfg, str(tiny_checkpoint), cfg.run.run_dir,
                          engine=GoldAnswerEngine({}))
    solutions = {}
    for name, items in evaluator.items.items():
        problems = load_problems(name, cfg.eval.sources[name], "test", 40)
        assert [p.problem_id for p in problems] == [i.prompt_id for i in items]
        solutions.update({tuple(i.prompt_ids): p.solution for i, p in zip(items, problems,
                                                                          strict=True)})
    evaluator.engine = GoldAnswerEngine(solutions)
    rows = {r["dataset"]: r for r in evaluator.evaluate("gold", step=0)}
    for name in ("gsm8k", "math500"):
        assert rows[name]["n"] == 40
        assert rows[name]["greedy_acc"] == 1.0
        assert rows[name]["maj@3"] == 1.0 and rows[name]["pass@3"] == 1.0
    assert sum(v["n"] for v in rows["math500"]["by_subject"].values()) == 40
    assert sum(v["n"] for v in rows["math500"]["by_level"].values()) == 40
    report = (Path(cfg.run.run_dir) / "report.md").read_text()
    assert "100.0" in report


@pytest.mark.ray
def test_evaluator_actor_scores_checkpoints_while_training(tmp_path, tiny_checkpoint,
                                                          ray_address):
    store = write_toy_store(tmp_path / "store", tiny_checkpoint, shards=2, rows_per_shard=96)
    score_reference(store, str(tiny_checkpoint), load_tokenizer(tiny_checkpoint).pad_token_id)
    cfg = eval_config(tmp_path, "gsm8k", 4, **{
        "eval.engine": "hf", "eval.max_new_tokens": 8, "model.policy": str(tiny_checkpoint),
        "data.store": str(tmp_path / "store"), "trainer.max_steps": 12,
        "trainer.checkpoint_every": 4, "trainer.log_every": 1, "trainer.num_to_keep": 3,
        "trainer.micro_batch_size": 8, "trainer.grad_accum_steps": 1,
        "trainer.policy_lr": 1e-3, "trainer.value_lr": 1e-3})
    run = Path(cfg.run.run_dir)
    evaluator = start_evaluator(cfg, str(tiny_checkpoint), str(run))
    ray.get(evaluator.watch.remote(str(run), 0, 0.2))
    # it yields the CPU to the engines and trainers: eval.cpu_nice below a Ray worker's
    worker_nice = ray.get(ray.remote(lambda: os.nice(0)).remote())
    assert ray.get(evaluator.__ray_call__.remote(lambda self: os.nice(0))) == min(
        19, worker_nice + cfg.eval.cpu_nice)
    train_on_store(cfg, str(tiny_checkpoint))  # the driver never calls the evaluator
    assert ray.get(evaluator.stop_watching.remote()) == 3
    results = read_jsonl(run / "results.jsonl")
    assert [r["step"] for r in results] == [4, 8, 12]
    assert all(r["dataset"] == "gsm8k" and r["n"] == 4 for r in results)
    # asynchronous: an evaluation finished while training was still reporting steps
    train_times = [m["time"] for m in read_jsonl(run / "train_metrics.jsonl")]
    assert min(r["time"] for r in results) < max(train_times)
    png = run / "accuracy.png"
    assert png.stat().st_size > 0 and (run / "report.md").stat().st_size > 0
    with Image.open(png) as image:
        image.verify()
    ray.kill(evaluator)
