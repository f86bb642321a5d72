"""Ray Train wiring: one TorchTrainer run whose workers train round after round.

    trainer = RoundTrainer(cfg, policy_path, run_dir)  # coordinator + epoch planner actors
    trainer.start()                      # fit() in a driver thread: workers start, load models
    trainer.prepare(r, data_rounds)      # as soon as round r's data is stored: epoch 0 is built
    result = trainer.train_round(r, data_rounds)  # posts round r, waits for its checkpoint
    trainer.close()                      # no more rounds: the workers end, fit() returns

Each worker builds its engines (policy, value model, pi_ref) once, then loops: ask the round
coordinator (`train/rounds.py`) for the next round, train it (`train/loop.py`), checkpoint at
its end, and (rank 0) report it done with the policy's weights in the object store, so the
generator engines refresh without a disk round trip. The workers, their DeepSpeed engines and
their optimizer state live for the whole pipeline: no round pays for a worker group's start.

Fault tolerance: FailureConfig(max_failures) restarts the worker group after a worker dies;
every worker then resumes from the newest committed checkpoint (the coordinator's record or
Ray Train's, whichever is newer) at the exact step, and carries on with the round it was in.
Re-running the same job with the same run folder resumes too: Ray Train V2 keeps a snapshot
of reported checkpoints under run_dir/train and `get_checkpoint()` returns the latest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dqo_ray.config import Config, from_dict, to_dict
from dqo_ray.data.groups import outcome_mix, require_mixed
from dqo_ray.data.store import TrajectoryStore
from dqo_ray.data.streams import TrajectoryCollate, planner_actor, split_step_batches
from dqo_ray.device import choose_device
from dqo_ray.io import writing
from dqo_ray.models import load_tokenizer, resolve_checkpoint
from dqo_ray.models.weight_broadcast import WeightSender
from dqo_ray.models.weights import export_tensors, weights_blob
from dqo_ray.runtime import WORKER_ENV, init_ray, record_placement
from dqo_ray.tracking import MetricsLogger
from dqo_ray.train.loop import STATE_FILE, WorkerIO, build_models, resume, train_round
from dqo_ray.train.rounds import RoundCoordinator, checkpoint_step

log = logging.getLogger(__name__)
POLL_S = 2.0  # how often blocked waits on the coordinator look up (driver: is fit() alive?)
BROADCAST_TIMEOUT_S = 300.0  # a broadcast that stalls this long fails; engines read the folder


@dataclass
class TrainResult:
    checkpoint: str  # folder (or URI) of the round's final checkpoint
    policy: str  # its HF-format policy export
    metrics: dict[str, Any]
    weights: Any = None  # for the engines' refresh: ObjectRef of the bytes, or a WeightOffer


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
    run_dir, policy_path = config["run_dir"], config["policy_path"]
    coordinator, planner = config["coordinator"], config["planner"]
    record_placement(run_dir, "train-worker", rank)
    starts = ray.get(coordinator.started.remote(rank))
    if rank == 1 and config.get("pid_file"):  # lets tests kill a real worker process
        Path(config["pid_file"]).write_text(str(os.getpid()))
    if rank == 0:
        log.info("trainer worker group start %d (%d workers)", starts, world)

    collate = TrajectoryCollate(load_tokenizer(policy_path).pad_token_id)
    tcfg = cfg.trainer
    scratch = Path(tempfile.mkdtemp(prefix="dqo-ckpt-"))
    ledger = Path(config["ledger"]) if config.get("ledger") else None
    logger = MetricsLogger(run_dir, cfg.run, config["config"]) if rank == 0 else None
    data_stats: dict[str, float] = {}

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        if folder is None:
            # Metrics-only steps stay local (rank 0's MetricsLogger has them): a Ray Train
            # report is a barrier through the controller, ~1.5 s each (benchmarks/RESULTS.md).
            return
        # A deterministic name (checkpoint-<step>) lets the evaluator find each checkpoint
        # from the metrics file, which rank 0 writes only after this report has persisted it.
        # The local copy goes once uploaded: nothing piles up in the temp folder over rounds.
        with writing(f"{run_dir}/train/{folder.name}", "a checkpoint into the run folder"):
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=folder.name,
                             delete_local_checkpoint_after_upload=True)
        shutil.rmtree(folder, ignore_errors=True)
        coordinator.checkpointed.remote(f"{run_dir}/train/{folder.name}", rank, world)

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        assert logger is not None
        logger.log({**metrics, **data_stats}, step)  # + the data's shape

    backend = broadcast_backend(cfg, device)  # None: the object store
    sender: WeightSender | None = None

    def hand_over(state_dict: dict[str, torch.Tensor]) -> Any:
        """The round's weights for the engines' refresh: an ObjectRef of their bytes, or the
        offer of a broadcast from this rank (which drops the previous round's offer)."""
        nonlocal sender
        if backend is None:
            return ray.put(weights_blob(state_dict, models.export_dtype))
        if sender is not None:
            sender.close()
        sender = WeightSender(export_tensors(state_dict, models.export_dtype), backend,
                              ray.util.get_node_ip_address(), BROADCAST_TIMEOUT_S, device)
        return sender.offer

    try:
        models = build_models(cfg, policy_path, device)
        resume_dir = _newest_checkpoint(ray.get(coordinator.latest_checkpoint.remote()),
                                        scratch / "resume")
        state = resume(models, resume_dir, rank)
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)  # loaded: its bytes are in memory
        after, weights = -1, None
        while (spec := _next_round(coordinator, after)) is not None:
            r, data_rounds = spec["round"], spec["data_rounds"]
            data_stats = spec["data_stats"]

            def batches(epoch: int, skip: int, r: int = r, data_rounds: Any = data_rounds):
                split = ray.get(planner.split.remote(epoch, rank, r, data_rounds))
                return split_step_batches(split, tcfg.micro_batch_size, tcfg.grad_accum_steps,
                                          skip, collate, tcfg.prefetch_batches)

            io = WorkerIO(rank=rank, world_size=world, batches=batches, report=report,
                          scratch=scratch, ledger=ledger, device=device,
                          log_metrics=log_metrics if logger else None)
            state = train_round(cfg, models, io, state, r, policy_path)
            state_dict = models.engines["policy"].full_state_dict()  # collective (ZeRO-3)
            if rank == 0:
                weights = hand_over(state_dict)
                checkpoint = f"{run_dir}/train/checkpoint-{state.step:07d}"
                coordinator.round_done.remote(r, {
                    "checkpoint": checkpoint, "step": state.step, "weights": [weights],
                    "metrics": _last_metrics(Path(run_dir), state.step)})
            del state_dict
            after = r
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if sender is not None:
            sender.close()
        if logger is not None:
            logger.close()


def broadcast_backend(cfg: Config, device: torch.device) -> str | None:
    """generation.weight_transfer resolved on a trainer worker's `device`: the collective's
    backend for a broadcast, or None for the object store."""
    transfer = cfg.generation.weight_transfer
    if transfer == "object_store" or (transfer == "auto" and device.type != "cuda"):
        return None
    return "nccl" if device.type == "cuda" else "gloo"


def _next_round(coordinator: Any, after: int) -> dict[str, Any] | None:
    while True:
        spec = ray.get(coordinator.next_round.remote(after, POLL_S * 5))
        if spec != "wait":
            return spec


def _newest_checkpoint(recorded: str | None, dest: Path) -> Path | None:
    """A local copy of the newest committed checkpoint: Ray Train's `get_checkpoint()` or the
    coordinator's record, whichever has the higher step (Ray may not have registered the
    newest report yet); None on a fresh start."""
    ray_ckpt = ray.train.get_checkpoint()
    ray_path = ray_ckpt.path if ray_ckpt is not None else None
    if ray_path is None and recorded is None:
        return None
    if checkpoint_step(recorded) > checkpoint_step(ray_path):
        ray_ckpt = ray.train.Checkpoint(recorded)
    return Path(ray_ckpt.to_directory(str(dest)))


def _last_metrics(run_dir: Path, step: int) -> dict[str, Any]:
    """Rank 0's metrics line at `step` (its numbers), for the pipeline's record."""
    path = run_dir / "train_metrics.jsonl"
    for line in reversed(path.read_text().splitlines() if path.exists() else []):
        record = json.loads(line)
        if record.get("step") == step:
            return {k: v for k, v in record.items() if isinstance(v, int | float)}
    return {}


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


def _resume_position(run_dir: Path) -> tuple[int, int]:
    """(round, epoch) of the newest checkpoint on disk, else (0, 0)."""
    states = sorted((run_dir / "train").glob(f"checkpoint-*/{STATE_FILE}"))
    if not states:
        return 0, 0
    state = json.loads(states[-1].read_text())
    return state.get("round", 0), state["epoch"]


class RoundTrainer:
    """The driver's side of one Ray Train run for many rounds; see the module docstring.

    Checkpoints, metrics and the placement record go to `run_dir`; `latest_checkpoint` (the
    last finished round's, from the pipeline's state) is where restarted workers resume at
    the latest; `rounds`: how many the run may train (checkpoint retention)."""

    def __init__(self, cfg: Config, policy_path: str, run_dir: str | os.PathLike,
                 latest_checkpoint: str | None = None, pid_file: str | None = None,
                 rounds: int = 1) -> None:
        init_ray(cfg.ray)
        self.run_dir = Path(run_dir).absolute()
        self.store = TrajectoryStore(cfg.store)
        policy_path = str(Path(policy_path).absolute())  # workers run in their own folder
        model = cfg.model
        if model.value is not None and cfg.algo.has_value_model:  # rft/dpo ignore it
            model = dataclasses.replace(model, value=resolve_checkpoint(model.value, self.run_dir,
                                                                        "model.value"))
        if model.reference is not None:
            model = dataclasses.replace(model, reference=resolve_checkpoint(
                model.reference, self.run_dir, "model.reference"))
        self.cfg = cfg = dataclasses.replace(cfg, model=model)
        tcfg = cfg.trainer
        ledger = None
        if tcfg.ledger:
            ledger = self.run_dir / "ledger"
            ledger.mkdir(parents=True, exist_ok=True)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # On the driver's node, with no CPU: it lives and dies with the driver, as the run does.
        self.coordinator = ray.remote(RoundCoordinator).options(
            num_cpus=0, max_concurrency=64, scheduling_strategy=here).remote(latest_checkpoint)
        self.balanced = cfg.data.prompt_groups == "balanced" and cfg.algo.has_value_model
        self.planner = planner_actor(
            cfg.store, cfg.data.rounds or None, {int(k): v for k, v in cfg.data.round_weights.items()},
            cfg.data.shuffle_seed, tcfg.num_workers, pairs=cfg.algo.name == "dpo",
            run_rows=tcfg.max_steps * tcfg.micro_batch_size * tcfg.grad_accum_steps
            * tcfg.num_workers, balanced=self.balanced,
            in_process_rows=cfg.data.epoch_in_process_rows)
        self.trainer = TorchTrainer(
            _worker_main,
            train_loop_config={"config": to_dict(cfg), "policy_path": policy_path,
                               "run_dir": str(self.run_dir), "coordinator": self.coordinator,
                               "planner": self.planner, "pid_file": pid_file,
                               "ledger": str(ledger) if ledger else None},
            scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                         placement_strategy=tcfg.placement.upper(),
                                         resources_per_worker={"CPU": tcfg.cpus_per_worker,
                                                               **cfg.ray.role_resource("trainer")}),
            torch_config=TorchConfig(backend=choose_device(tcfg.use_gpu).backend),
            run_config=ray.train.RunConfig(  # Ray's, not dqo_ray.config.RunConfig
                name="train", storage_path=str(self.run_dir),
                failure_config=FailureConfig(max_failures=tcfg.max_failures),
                # trainer.num_to_keep for each of the last two rounds: the evaluator may still
                # be scoring a round's checkpoints when the next ends; disk does not grow.
                checkpoint_config=CheckpointConfig(
                    num_to_keep=tcfg.num_to_keep * min(rounds, 2)),
                worker_runtime_env={"env_vars": WORKER_ENV}),
        )
        self._thread: threading.Thread | None = None
        self._outcome: Any = None  # fit()'s Result, or the exception it raised
        self._prepared: dict[int, dict[str, float]] = {}

    def start(self) -> None:
        """Starts the run (once): its workers load their models while the driver goes on."""
        if self._thread is not None:
            return

        def fit() -> None:
            try:
                self._outcome = self.trainer.fit()
            except BaseException as exc:  # re-raised by train_round on the driver's thread
                self._outcome = exc

        self._thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
        self._thread.start()

    def wait_placed(self) -> None:
        """Returns once every worker's train function has started (the group is placed and
        holds its resources); raises if the run ended first."""
        self.start()
        n = self.cfg.trainer.num_workers
        while not ray.get(self.coordinator.wait_started.remote(n, POLL_S)):
            self._raise_if_ended("its workers were placed")

    def _raise_if_ended(self, what: str) -> None:
        assert self._thread is not None
        if not self._thread.is_alive():
            error = getattr(self._outcome, "error", self._outcome)
            raise RuntimeError(f"the trainer run ended before {what}: {error!r}") from (
                error if isinstance(error, BaseException) else None)

    def prepare(self, r: int, data_rounds: list[int] | None) -> dict[str, float]:
        """Checks round r's shards (scored, undamaged, mixed enough) and has the planner build
        its first epoch now; idempotent. Returns the data's shape, logged with the metrics."""
        if r in self._prepared:
            return self._prepared[r]
        cfg, store = self.cfg, self.store
        shards = store.shards(data_rounds)
        if not shards:
            raise ValueError(f"store {cfg.store!r} has no shards for rounds "
                             f"{data_rounds or 'all'}")
        missing = [s.name for s in shards if not s.has_ref_logprobs]
        if missing:
            raise ValueError(f"shards {missing[:5]} lack ref_logprobs: run the reference stage")
        store.check(shards)  # before any worker reads them: a damaged shard is named, not raised
        mix = outcome_mix(*store.read_table(shards, ["prompt_id", "correct"]).to_pydict().values())
        log.info("round %d training data: %d prompts, %.1f%% with mixed outcomes, %.1f%% all "
                 "wrong", r, mix["prompts"], 100 * mix["mixed_prompt_frac"],
                 100 * mix["all_wrong_prompt_frac"])
        if cfg.algo.name == "dpo":
            require_mixed(mix, "algo.name=dpo", cfg.store)
        elif self.balanced:
            require_mixed(mix, "data.prompt_groups=balanced", cfg.store)
        at_round, epoch = _resume_position(self.run_dir)
        self.planner.plan_round.remote(r, data_rounds, epoch=epoch if at_round == r else 0)
        self._prepared[r] = {"mixed_prompt_frac": mix["mixed_prompt_frac"]}
        return self._prepared[r]

    def train_round(self, r: int, data_rounds: list[int] | None) -> TrainResult:
        """Trains round r on `data_rounds` and returns its final checkpoint and weights."""
        stats = self.prepare(r, data_rounds)
        self.start()
        end = (r + 1) * self.cfg.trainer.max_steps
        self.coordinator.post.remote({"round": r, "data_rounds": data_rounds, "end_step": end,
                                      "data_stats": stats})
        log.info("round %d: training to step %d on data rounds %s", r, end,
                 data_rounds if data_rounds is not None else "all")
        while (done := ray.get(self.coordinator.wait_done.remote(r, POLL_S))) is None:
            self._raise_if_ended(f"round {r} was trained")
        self._prepared.pop(r, None)
        checkpoint = done["checkpoint"]
        return TrainResult(checkpoint=checkpoint, policy=f"{checkpoint}/policy",
                           metrics=done["metrics"], weights=done["weights"][0])

    def starts(self) -> int:
        """How many times the worker group's train function started (1 + restarts)."""
        return ray.get(self.coordinator.started.remote(-1))

    def close(self) -> None:
        """No more rounds: the workers leave their loop and fit() returns; the actors end."""
        try:
            self.coordinator.stop.remote()
            if self._thread is not None:
                self._thread.join()
        finally:
            ray.kill(self.planner)
            ray.kill(self.coordinator)


def train_on_store(cfg: Config, policy_path: str, pid_file: str | None = None,
                   run_dir: str | None = None) -> TrainResult:
    """Trains on the store's trajectories (data.rounds, with ref_logprobs) until
    trainer.max_steps: a run of one round. Checkpoints, metrics and the placement record go
    to `run_dir` (default cfg.run.run_dir); re-running with the same run_dir resumes from its
    last committed checkpoint."""
    trainer = RoundTrainer(cfg, policy_path, run_dir or cfg.run.run_dir, pid_file=pid_file)
    try:
        log.info("training %d workers on the store's rounds %s -> %s",
                 cfg.trainer.num_workers, cfg.data.rounds or "all", trainer.run_dir / "train")
        return trainer.train_round(0, cfg.data.rounds or None)
    finally:
        trainer.close()
