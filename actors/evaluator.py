"""The evaluator actor: scores checkpoints on the test sets while training goes on.

    evaluator = start_evaluator(cfg, base_checkpoint)        # a Ray actor
    ref = evaluator.evaluate.remote(checkpoint, step, round)  # queued; training does not wait
    evaluator.watch.remote(run_dir)                           # or: follow a training run

Per checkpoint and dataset: greedy accuracy, and with eval.samples = k > 1 the mean sample
accuracy, maj@k and pass@k; MATH broken down by subject and level. Every result is appended
to run_dir/results.jsonl and report.md + accuracy.png are rewritten. Checkpoints load through
the engine interface (vLLM weight refresh in place, HF otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray

from actors.engines import GenerationEngine, SamplingSpec, make_engine
from dqo_ray.config import Config, TaskConfig
from dqo_ray.evaluation import (
    ProblemResult,
    answer_key,
    append_result,
    majority_correct,
    read_results,
    summarize,
    write_report,
)
from dqo_ray.models import load_tokenizer
from dqo_ray.runtime import node_info, node_name
from dqo_ray.storage import not_visible, removed_by_retention, require_visible
from dqo_ray.tasks import configure_grading, grade_many
from dqo_ray.tasks.items import PromptItem, load_items

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, cfg: Config, model_path: str, run_dir: str,
                 engine: GenerationEngine | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        ecfg = cfg.eval
        if engine is None:
            require_visible(model_path, node_name(), "the evaluator")
        self.engine = engine or make_engine(ecfg.engine, model_path, seed=cfg.run.seed,
                                            kv_cache_gb=cfg.generation.kv_cache_gb,
                                            dtype=cfg.model.dtype,
                                            in_process=cfg.generation.vllm_in_process,
                                            **cfg.generation.vllm_memory)
        self.loaded = model_path
        tokenizer = load_tokenizer(model_path)
        configure_grading(cfg.grading)  # this actor's math_verify pool
        self.items: dict[str, list[PromptItem]] = {}
        for name in ecfg.datasets:
            task = TaskConfig(name=name, source=ecfg.sources.get(name), split=ecfg.split,
                              limit=ecfg.limit, k_shot=ecfg.k_shot)
            self.items[name] = load_items(task, tokenizer, cfg.run.seed)
        self._lock = threading.Lock()  # one evaluation at a time on the engine
        self._watchers: dict[Path, tuple[threading.Thread, threading.Event]] = {}
        self._failures: dict[Path, Exception] = {}  # a followed run's error, for stop_watching
        # A restarted run must not score a checkpoint twice: results.jsonl says what is done.
        self._seen: set[str] = {str(r.get("checkpoint")) for r in read_results(self.run_dir)}

    def where(self) -> dict[str, Any]:
        return node_info()

    def evaluate(self, checkpoint: str, step: int, round: int | None = None) -> list[dict]:
        """Scores `checkpoint` (an HF folder) on every dataset; returns the result rows."""
        with self._lock:
            start = time.perf_counter()
            if checkpoint != self.loaded:
                try:
                    self.engine.load_weights(checkpoint)
                except Exception:  # the clear error when the folder is not on this node
                    require_visible(checkpoint, node_name(), "the evaluator")
                    raise
                self.loaded = checkpoint
            rows = [self._score(name, items, checkpoint, step, round)
                    for name, items in self.items.items()]
            write_report(self.run_dir)
            log.info("evaluated %s (step %d) in %.1fs: %s", checkpoint, step,
                     time.perf_counter() - start,
                     ", ".join(f"{r['dataset']} {100 * r['greedy_acc']:.1f}%" for r in rows))
            return rows

    def _score(self, name: str, items: list[PromptItem], checkpoint: str, step: int,
               round: int | None) -> dict[str, Any]:
        ecfg, start = self.cfg.eval, time.perf_counter()
        prompts = [list(i.prompt_ids) for i in items]
        greedy = self.engine.generate(prompts, SamplingSpec(
            n=1, temperature=0.0, max_new_tokens=ecfg.max_new_tokens, stop=items[0].stop))
        task = items[0].task
        greedy_ok = grade_many(task, [g[0].text for g in greedy], [i.gold for i in items])
        sampled: list[list[Any]] = [[] for _ in items]
        if ecfg.samples > 1:
            sampled = self.engine.generate(prompts, SamplingSpec(
                n=ecfg.samples, temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens,
                seed=self.cfg.run.seed, stop=items[0].stop))
        texts = [s.text for group in sampled for s in group]
        sample_ok = grade_many(task, texts, [i.gold for i in items for _ in range(ecfg.samples)]) \
            if texts else []
        results = []
        for p, item in enumerate(items):
            ok = sample_ok[p * ecfg.samples:(p + 1) * ecfg.samples] if texts else []
            keys = [answer_key(task, s.text) for s in sampled[p]]
            majority = majority_correct(keys, ok) if keys else None
            results.append(ProblemResult(item.prompt_id, name, greedy_ok[p], list(ok), keys,
                                         majority, dict(item.meta)))
        predictions = self.run_dir / "predictions" / f"{name}-step{step:07d}.jsonl"
        predictions.parent.mkdir(parents=True, exist_ok=True)
        with open(predictions, "w") as f:  # what the model actually wrote, for people to read
            for item, group, result in zip(items, greedy, results, strict=True):
                f.write(json.dumps({"problem_id": item.prompt_id, "gold": item.gold,
                                    "greedy": group[0].text, "correct": result.greedy_correct,
                                    "samples_correct": result.sample_correct}) + "\n")
        row = {"checkpoint": checkpoint, "step": step, "round": round, "dataset": name,
               "time": time.time(), "eval_seconds": time.perf_counter() - start,
               **summarize(results, ecfg.samples if ecfg.samples > 1 else None)}
        append_result(self.run_dir, row)
        return row

    # -- following a training run -----------------------------------------------------------

    def watch(self, train_run_dir: str, round: int | None = None, poll_s: float = 1.0,
              step_offset: int = 0, visible_within_s: float = 120.0) -> None:
        """Evaluates every checkpoint a training run commits, in a background thread, until
        `stop_watching`; several runs can be followed at once. The actor is threaded, so its
        calls may run out of order: wait for `watch` before sending the `stop_watching`. Checkpoints are announced by
        rank 0's metrics file (a line with checkpoint=true is written after Ray committed
        checkpoint-<step>); results are recorded at step + step_offset, with `round`, else the
        round the metrics line names (a pipeline's trainer counts steps over all rounds). An announced checkpoint this node has not seen within
        `visible_within_s` (shared file systems cache directory listings for a while) stops the
        following with CheckpointNotVisible, raised by `stop_watching`."""
        run = Path(train_run_dir)
        if run in self._watchers:
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._follow, args=(run, round, poll_s, step_offset,
                                                             stop, visible_within_s),
                                  daemon=True)
        thread.start()  # before it is registered: stop_watching may join it at once
        self._watchers[run] = (thread, stop)

    def _pending(self, run: Path) -> list[tuple[int, Path, int | None]]:
        found = []
        metrics = run / "train_metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now
                if record.get("checkpoint"):
                    path = run / "train" / f"checkpoint-{int(record['step']):07d}" / "policy"
                    if str(path) not in self._seen:  # (the round: a pipeline's metrics say)
                        found.append((int(record["step"]), path, record.get("round")))
        return found

    def _follow(self, run: Path, round: int | None, poll_s: float, step_offset: int,
                stop: threading.Event, visible_within_s: float) -> None:
        missing_since: dict[Path, float] = {}  # announced, not (yet) seen on this node
        try:
            while True:
                stopping = stop.is_set()  # read before the scan: drain once after stop
                for step, path, record_round in self._pending(run):
                    if not path.exists():
                        existing = [int(p.name.removeprefix("checkpoint-"))
                                    for p in (run / "train").glob("checkpoint-*")
                                    if p.name.removeprefix("checkpoint-").isdigit()]
                        if removed_by_retention(step, existing):
                            missing_since.pop(path, None)
                            self._seen.add(str(path))
                            log.warning("checkpoint %s was removed (trainer.num_to_keep) "
                                        "before evaluation", path)
                        elif (time.monotonic() - missing_since.setdefault(path, time.monotonic())
                              > visible_within_s):
                            raise not_visible(path, node_name(), "the evaluator")
                        continue  # else looked for again at the next poll
                    missing_since.pop(path, None)
                    self._seen.add(str(path))
                    self.evaluate(str(path), step + step_offset,
                                  record_round if round is None else round)
                if stopping and not missing_since:
                    return
                time.sleep(poll_s)
        except Exception as exc:  # the thread dies: its error waits for stop_watching
            log.error("evaluator: stopped following %s: %s", run, exc)
            self._failures[run] = exc

    def stop_watching(self, train_run_dir: str | None = None) -> int:
        """Stops following `train_run_dir` (default: every run) after evaluating every
        checkpoint announced so far; returns how many checkpoints were evaluated in total.
        Raises the error that stopped following a run (a checkpoint this node cannot see)."""
        runs = [Path(train_run_dir)] if train_run_dir else list(self._watchers)
        for run in runs:
            if run in self._watchers:
                thread, stop = self._watchers.pop(run)
                stop.set()
                thread.join()
        failures = [self._failures.pop(run) for run in runs if run in self._failures]
        if failures:  # e.g. a checkpoint this node cannot see
            raise failures[0]
        return len(self._seen)


class EvaluatorActor(Evaluator):
    """The evaluator in a Ray actor process of its own, which yields the CPU (eval.cpu_nice)
    to the engines and trainers beside it: its scores are not on any round's critical path."""

    def __init__(self, cfg: Config, model_path: str, run_dir: str) -> None:
        if cfg.eval.cpu_nice:
            os.nice(cfg.eval.cpu_nice)
        super().__init__(cfg, model_path, run_dir)


def start_evaluator(cfg: Config, model_path: str, run_dir: str) -> Any:
    """The evaluator as a Ray actor (GPU when eval.gpus > 0)."""
    # Blocking calls (evaluate, stop_watching per followed run) each hold a slot; the engine
    # itself is used by one evaluation at a time (self._lock).
    options: dict[str, Any] = {"num_cpus": cfg.eval.cpus, "max_concurrency": 16,
                               "resources": cfg.ray.role_resource("evaluator")}
    if cfg.eval.gpus:
        options["num_gpus"] = cfg.eval.gpus
    return ray.remote(EvaluatorActor).options(**options).remote(cfg, model_path, run_dir)
