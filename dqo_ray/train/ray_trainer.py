"""Ray Train wiring: a TorchTrainer whose workers run train/loop.py on the store's stream.

Fault tolerance: FailureConfig(max_failures) restarts the worker group after a worker dies;
every worker then resumes from the last reported checkpoint (DeepSpeed state + epoch
position). Re-running the same job with the same run folder resumes too: Ray Train V2 keeps
a snapshot of reported checkpoints under run_dir/train and `get_checkpoint()` returns the
latest, so a restarted job continues from it instead of step 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dqo_ray.config import Config, from_dict, to_dict
from dqo_ray.data.groups import outcome_mix, require_mixed
from dqo_ray.data.store import TrajectoryStore
from dqo_ray.data.streams import TrajectoryCollate, planner_actor, split_step_batches
from dqo_ray.device import choose_device
from dqo_ray.models import load_tokenizer, resolve_checkpoint
from dqo_ray.runtime import WORKER_ENV, init_ray, record_placement
from dqo_ray.tracking import MetricsLogger
from dqo_ray.train.loop import STATE_FILE, WorkerIO, run_training

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: str  # folder (or URI) of the final checkpoint
    policy: str  # its HF-format policy export
    metrics: dict[str, Any]


def _worker_main(config: dict[str, Any]) -> None:
    cfg = from_dict(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))
    device = _worker_device(cfg.trainer.use_gpu, rank)
    # DS_ACCELERATOR from this worker's device, before anything imports DeepSpeed
    # (transformers does, when it loads a model or tokenizer).
    os.environ.update(choose_device(device.type == "cuda").env)
    record_placement(config["run_dir"], "train-worker", rank)
    if rank == 1 and config.get("pid_file"):  # lets tests kill a real worker process
        Path(config["pid_file"]).write_text(str(os.getpid()))

    planner = config["planner"]
    collate = TrajectoryCollate(load_tokenizer(config["policy_path"]).pad_token_id)
    tcfg = cfg.trainer

    def batches(epoch: int, skip: int):
        split = ray.get(planner.split.remote(epoch, rank))
        return split_step_batches(split, tcfg.micro_batch_size, tcfg.grad_accum_steps, skip,
                                  collate, tcfg.prefetch_batches)

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        if folder is None:
            # Metrics-only steps stay local (rank 0's MetricsLogger has them): a Ray Train
            # report is a barrier through the controller, ~1.5 s each (benchmarks/RESULTS.md).
            return
        # A deterministic name (checkpoint-<step>) lets the evaluator find each checkpoint
        # from the metrics file, which rank 0 writes only after this report has persisted it
        # (Ray makes it the resume point at its controller's next poll, about a second later).
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=folder.name)

    scratch = Path(tempfile.mkdtemp(prefix="dqo-ckpt-"))
    resume = ray.train.get_checkpoint()
    resume_dir = Path(resume.to_directory(str(scratch / "resume"))) if resume else None
    ledger = Path(config["ledger"]) if config.get("ledger") else None
    logger = MetricsLogger(config["run_dir"], cfg.run, config["config"]) if rank == 0 else None

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        assert logger is not None
        logger.log({**metrics, **config.get("data_stats", {})}, step)  # + the data's shape

    run_training(cfg, config["policy_path"], WorkerIO(
        rank=rank, world_size=world, batches=batches, report=report, resume_from=resume_dir,
        scratch=scratch, ledger=ledger, device=device,
        log_metrics=log_metrics if logger else None))
    if logger is not None:
        logger.close()


def _worker_device(use_gpu: bool, rank: int) -> torch.device:
    """The GPU Ray Train gave this worker (trainer.use_gpu), else the CPU. Not
    torch.cuda.is_available() alone: Ray leaves GPUs visible to a worker that asked for none."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"trainer.use_gpu: train worker {rank} on {socket.gethostname()} "
                           "got a GPU from Ray but torch sees no CUDA device (a CPU-only torch "
                           "build, or no driver on that node)")
    return ray.train.torch.get_device()


def _resume_epoch(run_dir: Path) -> int:
    """The epoch a (re)started run begins in: that of its newest checkpoint, else 0."""
    states = sorted((run_dir / "train").glob(f"checkpoint-*/{STATE_FILE}"))
    return json.loads(states[-1].read_text())["epoch"] if states else 0


def train_on_store(cfg: Config, policy_path: str, pid_file: str | None = None,
                   run_dir: str | None = None) -> TrainResult:
    """Trains on the store's trajectories (with ref_logprobs) until trainer.max_steps.

    Checkpoints, metrics and the placement record go to `run_dir` (default cfg.run.run_dir);
    re-running with the same run_dir resumes from its last committed checkpoint."""
    init_ray(cfg.ray)
    store = TrajectoryStore(cfg.store)
    shards = store.shards(cfg.data.rounds or None)
    if not shards:
        raise ValueError(f"store {cfg.store!r} has no shards for rounds "
                         f"{cfg.data.rounds or 'all'}")
    missing = [s.name for s in shards if not s.has_ref_logprobs]
    if missing:
        raise ValueError(f"shards {missing[:5]} lack ref_logprobs: run the reference stage")
    store.check(shards)  # before any worker reads them: a damaged shard is named, not raised
    run_dir = Path(run_dir or cfg.run.run_dir).absolute()
    policy_path = str(Path(policy_path).absolute())  # workers run in their own folder
    if cfg.model.value is not None and cfg.algo.has_value_model:  # rft/dpo ignore it
        value = resolve_checkpoint(cfg.model.value, run_dir, "model.value")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, value=value))
    ledger = None
    if cfg.trainer.ledger:
        ledger = run_dir / "ledger"
        ledger.mkdir(parents=True, exist_ok=True)
    if cfg.model.reference is not None:
        reference = resolve_checkpoint(cfg.model.reference, run_dir, "model.reference")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, reference=reference))
    mix = outcome_mix(*store.read_table(shards, ["prompt_id", "correct"]).to_pydict().values())
    log.info("training data: %d prompts, %.1f%% with mixed outcomes, %.1f%% all wrong",
             mix["prompts"], 100 * mix["mixed_prompt_frac"], 100 * mix["all_wrong_prompt_frac"])
    balanced = cfg.data.prompt_groups == "balanced" and cfg.algo.has_value_model
    if cfg.algo.name == "dpo":
        require_mixed(mix, "algo.name=dpo", cfg.store)
    elif balanced:
        require_mixed(mix, "data.prompt_groups=balanced", cfg.store)
    tcfg = cfg.trainer
    weights = {int(k): v for k, v in cfg.data.round_weights.items()}
    planner = planner_actor(cfg.store, cfg.data.rounds or None, weights,
                            cfg.data.shuffle_seed, tcfg.num_workers,
                            pairs=cfg.algo.name == "dpo",
                            run_rows=tcfg.max_steps * tcfg.micro_batch_size
                            * tcfg.grad_accum_steps * tcfg.num_workers,
                            balanced=balanced)
    planner.prefetch.remote(_resume_epoch(run_dir))  # overlaps the worker group's start-up
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"config": to_dict(cfg), "policy_path": str(policy_path),
                           "run_dir": str(run_dir), "planner": planner,
                           "ledger": str(ledger) if ledger else None, "pid_file": pid_file,
                           "data_stats": {"mixed_prompt_frac": mix["mixed_prompt_frac"]}},
        scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                     resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        torch_config=TorchConfig(backend=choose_device(tcfg.use_gpu).backend),
        run_config=ray.train.RunConfig(  # Ray's, not dqo_ray.config.RunConfig
            name="train", storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.num_to_keep),
            worker_runtime_env={"env_vars": WORKER_ENV}),
    )
    log.info("training %d workers on %d shards (%d rows) -> %s", tcfg.num_workers,
             len(shards), sum(s.num_rows for s in shards), run_dir / "train")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    path = result.checkpoint.path
    return TrainResult(checkpoint=path, policy=f"{path}/policy", metrics=dict(result.metrics))
