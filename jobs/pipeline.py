"""The offline-to-online DQO pipeline: the whole system as one Ray job.

    python -m jobs.pipeline --config FILE [--set key=value ...]
    ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml \\
        -- python -m jobs.pipeline --config FILE

Stages (docs/algorithm.md section 6), each recorded in run_dir/pipeline_state.json when done:

    start      the start policy: model.policy, or a tiny model built for the task; then the
               optional supervised warm start on gold solutions (cached by content)
    round0/data     round 0's trajectories: sampled from the start policy, or ingested
    round r:   reference   ref_logprobs for shards lacking them: ingested data only (the
                           engines hold pi_ref and score each chunk as they sample it)
               train       round r on the run's one trainer (Ray Train + DeepSpeed, started
                           once, while round 0 is sampled): data rounds 0..r
                           (data.round_weights), continuing round r-1's policy and value model
               data r+1    the generator pool, weights refreshed in place from the trainer's
                           memory (the object store, no disk), samples round r+1
    evaluate   every checkpoint the trainer commits, by the evaluator actor as they land;
               waited for at the end (round<r>/evaluate)

Before anything starts, the run's plan (dqo_ray.plan, as `python -m jobs.plan` prints it) is
checked against the cluster (ray.cluster, else the running one's nodes): a run the cluster
cannot hold is refused with one line per problem, naming the role and the numbers (exit 2);
then every node must see the run folder (a sentinel file read by one task per node).

Overlap (pipeline.overlap): round r+1 is sampled from the policy round r started from while
round r trains; the log reports how long both ran at once. The trainer's workers, the engines
and the evaluator live for the whole run, so the plan needs room for all of them at once.
Re-running the same command after a crash or `ray job stop` skips every recorded stage and
resumes the first unfinished one from its own partial work (stored prompts, the trainer's last
committed checkpoint, at the exact step). One driver holds a run folder at a time
(run_dir/driver.lock, dqo_ray.driver_lock): a second is refused with the first's host, pid and
job; a dead driver's lock is taken over.
"""

from __future__ import annotations

import _thread
import argparse
import concurrent.futures
import contextlib
import dataclasses
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import ray

from actors.evaluator import start_evaluator
from actors.generator import GeneratorPool
from dqo_ray.capacity import CapacityWatch
from dqo_ray.clusters import parse_cluster
from dqo_ray.config import Config, ConfigError, add_config_args, config_from_args, save_resolved
from dqo_ray.config import to_dict as config_to_dict
from dqo_ray.data.ingest import IngestError, ingest_file
from dqo_ray.data.store import StoreError, TrajectoryStore
from dqo_ray.data.streams import score_reference
from dqo_ray.driver_lock import DriverLock, RunFolderBusy
from dqo_ray.evaluation import read_results, write_report
from dqo_ray.evaluation.report import round_table, write_pipeline_summary
from dqo_ray.evaluation.round_costs import round_breakdown
from dqo_ray.io import DiskFull, disk_full_in, read_jsonl
from dqo_ray.model_shapes import model_shape
from dqo_ray.models import load_tokenizer, resolve_checkpoint, save_tiny_checkpoint
from dqo_ray.plan import Plan, make_plan
from dqo_ray.run_state import RunState, StateError
from dqo_ray.runtime import (
    ENGINE_LOG,
    autoscaler_request,
    check_run_folder_shared,
    init_ray,
    record_placement,
    running_cluster,
)
from dqo_ray.storage import RunFolderNotShared
from dqo_ray.tasks import get_task, load_problems
from dqo_ray.tasks.items import load_items
from dqo_ray.train.ray_trainer import RoundTrainer
from dqo_ray.train.warm_start import warm_start
from jobs.preflight import check_run_inputs

log = logging.getLogger("jobs.pipeline")


def plan_for_run(cfg: Config) -> Plan:
    """The plan on ray.cluster, else on the nodes of the Ray cluster this driver joined."""
    cluster = parse_cluster(cfg.ray.cluster) if cfg.ray.cluster else running_cluster()
    return make_plan(cfg, cluster, model_shape(cfg.model))


class Pipeline:
    def __init__(self, cfg: Config, state: RunState, plan: Plan | None = None) -> None:
        self.cfg, self.state = cfg, state
        self.plan = plan
        self.run_dir = Path(cfg.run.run_dir).absolute()
        self.store = TrajectoryStore(cfg.store)
        self.pool: GeneratorPool | None = None
        self.evaluations: dict[str, Any] = {}  # stage -> ObjectRef of the evaluator's work
        self.evaluators_lost = 0
        self.watching = False  # the evaluator follows the trainer's checkpoints
        self.trainer: RoundTrainer | None = None
        self.overlap_notes: list[str] = []

    # -- stages ------------------------------------------------------------------------------

    def run(self) -> None:
        start = self.start = self.start_policy()
        rounds = self.cfg.pipeline.rounds
        evaluations = ["evaluate/start"] * self.cfg.pipeline.evaluate_start + [
            f"round{r}/evaluate" for r in range(rounds)]
        if not all(map(self.state.done, evaluations)):  # a finished run re-prints its report
            self.start_evaluator()
        if self.cfg.pipeline.evaluate_start and not self.state.done("evaluate/start"):
            self.evaluations["evaluate/start"] = self.issue_evaluation("evaluate/start")
        plan = self.plan or plan_for_run(self.cfg)
        overlap = plan.overlap
        log.info("overlap %s (%s)", "on" if overlap else "off", plan.overlap_why)
        trained = [self.state.finished(f"round{r}/train") for r in range(rounds)]
        done = [t for t in trained if t is not None]
        policy, weights = (done[-1]["policy"] if done else start), None
        if None in trained:  # one Ray Train run for every round still to train
            self.trainer = RoundTrainer(self.trainer_config(start), start, self.run_dir,
                                        latest_checkpoint=done[-1]["checkpoint"] if done
                                        else None, rounds=rounds)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
            for r in range(rounds):
                if trained[r] is None and not self.ingested(r):
                    self.trainer.start()  # its workers load their models while r is sampled
                    if self.cfg.trainer.placement == "strict_pack" and self.pool is None:
                        self.trainer.wait_placed()  # its node first, then the engines
                self.data(r, policy, weights)  # a no-op when sampled during the last round
                self.reference(r, start)  # only data not scored as it was sampled (ingested)
                if trained[r] is not None:
                    continue
                self.trainer.prepare(r, list(range(r + 1)))  # epoch 0 of round r is built now
                self.watch()
                sampling = None  # round r+1, sampled from `policy` while round r trains
                if overlap and r + 1 < rounds and not self.state.done(f"round{r + 1}/data"):
                    sampling = background.submit(self.sample_and_plan, r + 1, policy, weights)
                trained[r], weights = self.train(r, overlapping=sampling)
                policy = trained[r]["policy"]
        if self.trainer is not None:
            log.info("the trainer's worker group started %d time(s) in this run",
                     self.trainer.starts())
            self.trainer.close()
        self.finish()

    def start_policy(self) -> str:
        """model.policy (or a tiny model built for the task), then the optional warm start."""
        cfg = self.cfg
        if cfg.model.policy == "tiny" and not self.state.done("start/tiny"):
            began = time.perf_counter()
            words = task_vocabulary(cfg)
            save_tiny_checkpoint(self.run_dir / "base", words,
                                 hidden_size=cfg.model.tiny_hidden_size,
                                 layers=cfg.model.tiny_layers, heads=cfg.model.tiny_heads,
                                 seed=cfg.run.seed)
            self.state.finish("start/tiny", time.perf_counter() - began, words=len(words))
        base = resolve_checkpoint(cfg.model.policy, self.run_dir, "model.policy")
        if not cfg.pipeline.warm_start.enabled:
            return base
        done = self.state.finished("start/warm")
        if done is None:
            began = time.perf_counter()
            done = warm_start(cfg, base)
            self.state.finish("start/warm", time.perf_counter() - began, **done)
        log.info("warm start: %s (final loss %.4f%s)", done["policy"], done["final_loss"],
                 ", cached" if done.get("cached") else "")
        return done["policy"]

    def ingested(self, r: int) -> bool:
        return r == 0 and self.cfg.pipeline.round0 == "ingest"

    def data(self, r: int, policy: str, weights: Any = None) -> None:
        """Data round r: ingested (round 0, pipeline.round0 = ingest) or sampled from `policy`
        (`weights`: its bytes in the object store, for a refresh without disk)."""
        stage = f"round{r}/data"
        if self.state.done(stage):
            return
        began = time.perf_counter()
        if self.ingested(r):
            try:
                report = ingest_file(self.cfg.pipeline.ingest_source, self.store,
                                     load_tokenizer(self.start), round=0, strict=True,
                                     reward_correct=self.cfg.algo.reward_correct,
                                     reward_incorrect=self.cfg.algo.reward_incorrect,
                                     max_prompt_tokens=self.cfg.data.max_prompt_tokens,
                                     max_response_tokens=self.cfg.data.max_response_tokens)
            except IngestError as exc:
                raise SystemExit(f"round 0 ingest failed: {exc}") from exc
            self.state.finish(stage, time.perf_counter() - began, source="ingest",
                              rows=report.written)
            log.info("round 0: %s", report.summary())
            return
        pool = self.generator_pool(policy)
        refresh = 0.0
        if pool.weights != policy:
            refresh = pool.load_weights(policy, weights)
        items = load_items(self.cfg.task, load_tokenizer(policy), self.cfg.run.seed)
        summary = pool.generate(items, r, policy_version=self.policy_version(policy),
                                store=self.store)
        log.info("round %d data: %s", r, summary)
        self.state.finish(stage, time.perf_counter() - began, source="generate", policy=policy,
                          samples=summary.samples, accuracy=summary.accuracy,
                          mean_response_tokens=summary.mean_response_tokens,
                          tokens_per_s=summary.tokens_per_s, started=began,
                          refresh_s=refresh, refresh_from="memory" if weights is not None
                          and refresh else "disk" if refresh else "none",
                          ref_s=summary.ref_seconds, sampling_share=summary.sampling_share)

    def sample_and_plan(self, r: int, policy: str, weights: Any) -> None:
        """Data round r, then its first epoch built at once (while round r-1 still trains),
        so that the trainer finds it ready."""
        self.data(r, policy, weights)
        assert self.trainer is not None
        self.trainer.prepare(r, list(range(r + 1)))

    def reference(self, r: int, start: str) -> None:
        """ref_logprobs for round r's shards that lack them: only ingested data (sampled rows
        are scored by the engines as they are sampled), with the Ray Data stage."""
        stage = f"round{r}/reference"
        if self.state.done(stage):
            return
        began = time.perf_counter()
        reference = self.reference_policy(start)
        rows = score_reference(self.store, reference, load_tokenizer(start).pad_token_id,
                               [r], self.cfg.data.ref_actors,
                               self.cfg.data.ref_batch_size, self.cfg.trainer.use_gpu)
        self.state.finish(stage, time.perf_counter() - began, rows=rows, reference=reference)

    def train(self, r: int, overlapping: concurrent.futures.Future | None
              ) -> tuple[dict[str, Any], Any]:
        """Round r on the run's trainer; returns its record and the policy's weights."""
        assert self.trainer is not None
        began = time.perf_counter()
        log.info("round %d: training %d steps%s", r, self.cfg.trainer.max_steps,
                 f" while round {r + 1} is sampled" if overlapping else "")
        result = self.trainer.train_round(r, list(range(r + 1)))
        ended = time.perf_counter()
        if overlapping is not None:
            overlapping.result()  # the sampled round must be complete before it is trained on
            self.note_overlap(r, began, ended)
        done = {"checkpoint": result.checkpoint, "policy": result.policy,
                "value": f"{result.checkpoint}/value",
                "step": (r + 1) * self.cfg.trainer.max_steps, "started": began,
                "metrics": {k: v for k, v in result.metrics.items()
                            if isinstance(v, int | float)}}
        self.state.finish(f"round{r}/train", ended - began, **done)
        costs = round_breakdown(self.state.stages, read_jsonl(self.run_dir / "train_metrics.jsonl"))
        row = next(row for row in costs["rounds"] if row["round"] == r)
        log.info("round %d trained in %.0fs: steps %.0fs, to the first step %.0fs, checkpoints "
                 "%.0fs, other %.0fs | its data: sampled in %.0fs (%.0fs with no training "
                 "beside it), engines refreshed in %.2fs", r, ended - began, row["steps"],
                 row["start"], row["checkpoint"], row["other"], row["sampling"], row["exposed"],
                 row["refresh"])
        return done, result.weights

    def finish(self) -> None:
        self.release_pool()
        rounds = [f"round{r}/evaluate" for r in range(self.cfg.pipeline.rounds)]
        if not all(map(self.state.done, rounds)):
            self.watch()  # (again, after a restart: results.jsonl keeps what was scored)
            self.evaluations["rounds"] = self.evaluator.stop_watching.remote(str(self.run_dir))
        began = time.perf_counter()
        for key in list(self.evaluations):
            log.info("waiting for the evaluator: %s", key)
            while True:
                try:
                    ray.get(self.evaluations[key])
                    break
                except ray.exceptions.RayActorError as exc:
                    self.replace_evaluator(exc)
            for stage in rounds if key == "rounds" else [key]:
                self.state.finish(stage, time.perf_counter() - began)
        write_pipeline_summary(self.run_dir, self.state.stages, self.overlap_notes)
        write_report(self.run_dir, title=f"DQO pipeline: {self.cfg.run.name}")

    # -- the evaluator: one actor, replaced when it (or its node) is lost ----------------------

    def start_evaluator(self) -> None:
        """Starts the evaluator without waiting for its engine to load (the generator's
        engines and the trainer start meanwhile); its placement is recorded once it is up."""
        self.evaluator = start_evaluator(self.cfg, self.start, str(self.run_dir))
        self.watching = False
        index = self.evaluators_lost

        def record(where: concurrent.futures.Future) -> None:
            if where.exception() is None:  # else its loss is handled where it is next used
                record_placement(self.run_dir, "evaluator", index, where.result())

        self.evaluator.where.remote().future().add_done_callback(record)

    def watch(self) -> None:
        """Has the evaluator follow the trainer's checkpoints as they are committed (once).
        Waited for: the evaluator is a threaded actor, so calls are not run in order, and the
        watch must be in place before the stop_watching sent at the end."""
        if self.watching:
            return
        try:
            ray.get(self.evaluator.watch.remote(str(self.run_dir)))
            self.watching = True
        except ray.exceptions.RayActorError as exc:
            self.replace_evaluator(exc)
            self.watch()

    def issue_evaluation(self, stage: str) -> Any:
        """The evaluator's work for the start policy (unless scored before a restart or a lost
        evaluator: results.jsonl says)."""
        if any(row.get("checkpoint") == self.start for row in read_results(self.run_dir)):
            return ray.put([])
        return self.evaluator.evaluate.remote(self.start, 0, None)

    def replace_evaluator(self, exc: Exception) -> None:
        """A new evaluator (on any node with room) that redoes the unfinished evaluations."""
        self.evaluators_lost += 1
        if self.evaluators_lost > self.cfg.eval.max_restarts:
            raise RuntimeError(f"the evaluator was lost {self.evaluators_lost} times, more "
                               f"than eval.max_restarts={self.cfg.eval.max_restarts} (last: "
                               f"{type(exc).__name__}: {exc})") from exc
        watched = self.watching
        pending = [key for key in self.evaluations
                   if not self.state.done("round0/evaluate" if key == "rounds" else key)]
        log.warning("evaluator lost (%s, its node may be gone): starting a new one; it redoes "
                    "%s", type(exc).__name__, ", ".join(pending) or "nothing yet")
        self.start_evaluator()
        if watched or "rounds" in pending:
            self.watch()
        for key in pending:
            self.evaluations[key] = (self.issue_evaluation(key) if key == "evaluate/start" else
                                     self.evaluator.stop_watching.remote(str(self.run_dir)))

    # -- helpers -----------------------------------------------------------------------------

    def generator_pool(self, policy: str) -> GeneratorPool:
        """The pool, started from `policy` at the first data round; it lives for the run."""
        if self.pool is None:  # its engines score samples with pi_ref as they go
            self.pool = GeneratorPool(self.cfg, policy, self.reference_policy(self.start))
            for i, actor in enumerate(self.pool.actors):
                record_placement(self.run_dir, "generator", i, ray.get(actor.where.remote()))
        return self.pool

    def release_pool(self) -> None:
        """Ends the engine actors (and their placement groups) at the end of the run."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def trainer_config(self, start: str) -> Config:
        """The trainer's: pi_ref is the start policy unless model.reference names one; each
        round names its data rounds itself."""
        return dataclasses.replace(
            self.cfg, data=dataclasses.replace(self.cfg.data, rounds=[]),
            model=dataclasses.replace(self.cfg.model, reference=self.reference_policy(start)))

    def reference_policy(self, start: str) -> str:
        """pi_ref: model.reference, else the start policy (the warm start when there is one)."""
        if self.cfg.model.reference:
            return resolve_checkpoint(self.cfg.model.reference, self.run_dir, "model.reference")
        return start

    def policy_version(self, policy: str) -> int:
        """Training rounds behind `policy`: 0 for the start policy, r+1 after round r."""
        for r in range(self.cfg.pipeline.rounds):
            trained = self.state.finished(f"round{r}/train")
            if trained and trained["policy"] == policy:
                return r + 1
        return 0

    def note_overlap(self, r: int, train_began: float, train_ended: float) -> None:
        sampled = self.state.finished(f"round{r + 1}/data")
        if not sampled or "started" not in sampled:
            return
        gen_began = sampled["started"]
        gen_ended = gen_began + self.state.stages[f"round{r + 1}/data"]["seconds"]
        both = max(0.0, min(gen_ended, train_ended) - max(gen_began, train_began))
        note = (f"round {r + 1} sampling ({gen_ended - gen_began:.1f}s) ran alongside round {r} "
                f"training ({train_ended - train_began:.0f}s); both at once for {both:.1f}s")
        log.info("overlap: %s", note)
        self.overlap_notes.append(note)


def task_vocabulary(cfg: Config) -> list[str]:
    """The words a tiny model's tokenizer needs: the task's own list (tinymath's), else the
    words of the training and evaluation problems."""
    words = get_task(cfg.task.name).vocabulary
    if words:
        return list(words)
    texts = [p.question + " " + (p.solution or "") for p in
             load_problems(cfg.task.name, cfg.task.source, cfg.task.split, cfg.task.limit)]
    for name in cfg.eval.datasets:
        texts += [p.question for p in load_problems(name, cfg.eval.sources.get(name),
                                                    cfg.eval.split, cfg.eval.limit)]
    return sorted({w for text in texts for w in re.findall(r"[A-Za-z]+", text)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    # Before anything starts: a run the cluster cannot hold would wait forever in Ray. On a
    # described cluster (ray.cluster) that is known before Ray is joined.
    plan = plan_for_run(cfg) if cfg.ray.cluster else None
    if plan is not None and not plan.ok:
        print(plan.refusal(), file=sys.stderr)
        return 2
    try:
        check_run_inputs(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    # One driver per run folder: a second one (a re-submit while the first still runs) would
    # run the same stages at once. Taken before Ray is joined, so a refused driver starts nothing.
    lock = DriverLock(cfg.run.run_dir, on_lost=_thread.interrupt_main)
    try:
        lock.acquire()
    except (RunFolderBusy, DiskFull) as exc:  # DiskFull: the run folder's disk, at once
        print(exc, file=sys.stderr)
        return 2
    try:
        return run_with_lock(cfg, plan, lock)
    except Exception as exc:
        full = disk_full_in(exc)
        if full is None:
            raise
        print(full, file=sys.stderr)  # nothing is half-written: a re-run resumes
        return 2
    finally:
        lock.release()


def run_with_lock(cfg: Config, plan: Plan | None, lock: DriverLock) -> int:
    """The rest of `main`, while this driver holds the run folder."""
    init_ray(cfg.ray, Path(cfg.run.run_dir) / ENGINE_LOG)
    if plan is not None:
        now = running_cluster()
        if now.gpus < plan.cluster.gpus:
            log.info("the plan is for %s; the running cluster has %d GPUs now: its roles wait "
                     "for the autoscaler to add nodes", plan.cluster.describe(), now.gpus)
    plan = plan or plan_for_run(cfg)
    if not plan.ok:
        print(plan.refusal(), file=sys.stderr)
        return 2
    try:
        check_run_folder_shared(cfg.run.run_dir)
        state = RunState(cfg.run.run_dir, config_to_dict(cfg))
    except (RunFolderNotShared, StateError) as exc:
        print(exc, file=sys.stderr)
        return 2
    save_resolved(cfg, cfg.run.run_dir)
    if state.attempt:
        log.info("resuming %s (start %d): finished stages %s", state.path, state.attempt,
                 ", ".join(state.stages) or "none")
    # A node lost mid-run (spot preemption) can leave too little for Ray to schedule the next
    # role: it would wait silently. The watch says so, and stops the run if asked to.
    watch = CapacityWatch(cfg, plan, running_cluster, _thread.interrupt_main, cfg.run.run_dir)
    watch.start()
    try:
        with (autoscaler_request(plan.phases["run"], cfg.run.run_dir)
              if cfg.ray.request_resources else contextlib.nullcontext()):
            Pipeline(cfg, state, plan).run()
    except StoreError as exc:  # damaged data: named, with what to do; re-running resumes
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if lock.lost:
            print(f"{lock.path}: another driver took over this run folder; this one stopped",
                  file=sys.stderr)
            return 1
        if watch.failure is None:
            raise
        print(watch.failure, file=sys.stderr)
        return 1
    finally:
        watch.stop()
    results = read_results(cfg.run.run_dir)
    print(round_table(results))
    print(f"run folder: {Path(cfg.run.run_dir).absolute()} (report.md, accuracy.png, "
          "pipeline.md, pipeline_state.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
