"""The per-worker training loop. No Ray here: Ray Train (train/ray_trainer.py), the bare
benchmark loop and the tests drive it through `WorkerIO`. A worker builds its models once
(`build_models`) and trains round after round on them (`train_round`): round r is global steps
r*max_steps+1 .. (r+1)*max_steps on that round's data; `run_training` is a run of one round.

Epoch accounting (what "no trajectory skipped or double-counted" means here):
- An epoch is one pass over the round's mixed data set in a fixed order that depends only on
  (data.shuffle_seed, epoch) (data/order.py); each round counts its epochs from 0. The order
  is cut into num_workers equal contiguous parts (at most num_workers-1 rows dropped); step s
  of the epoch trains rows [s*L, (s+1)*L) of every rank's part, L = micro_batch_size *
  grad_accum_steps. A trailing partial step is not trained in that epoch; the next reshuffles.
- A checkpoint records (round, epoch, step_in_epoch) with the optimizer and LR-schedule
  state. A resumed run, after a worker failure or a restart of the job, continues at exactly the next
  unconsumed step, so in the final history every row of an epoch is trained once at most and
  every position before the last step exactly once (checked by tests/test_train_ray.py from
  the ledger).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dqo_ray.config import AlgoConfig, Config
from dqo_ray.device import collective_device
from dqo_ray.io import append_jsonl, atomic_write, writing
from dqo_ray.models import (
    attn_implementation,
    load_policy,
    load_tokenizer,
    load_value,
    resolve_dtype,
)
from dqo_ray.train.step import loss_on_batch
from dqo_ray.train.train_engine import TrainEngine, build_engine, resolve_engine_kind

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer (global) steps done, over all rounds
    round: int = 0  # the training round `step` belongs to
    epoch: int = 0  # within the round
    step_in_epoch: int = 0  # global steps done within `epoch`
    rows: int = 0  # rows consumed in total (all workers)
    tokens: int = 0  # response tokens consumed in total (all workers)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(dataclasses.asdict(self)), what="the trainer's state")

    @classmethod
    def load(cls, path: Path) -> TrainState:
        return cls(**json.loads(path.read_text()))


@dataclass
class WorkerIO:
    rank: int
    world_size: int
    batches: Callable[[int, int], Iterator[list[Batch]]]
    """(epoch, steps_to_skip) -> per remaining global step of the epoch, this rank's
    grad_accum_steps micro-batches. Each micro-batch may carry `positions` [B] (epoch order)."""
    report: Callable[[dict[str, float], Path | None], None]
    """Called by every rank at the same steps; a checkpoint folder when one was written."""
    resume_from: Path | None = None
    scratch: Path = Path("/tmp/dqo-checkpoints")
    ledger: Path | None = None
    """When set, each rank appends the epoch positions it trained on per step (audits)."""
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    log_metrics: Callable[[dict[str, float], int], None] | None = None
    """Rank 0's sink for every report (dqo_ray.tracking.MetricsLogger.log)."""


def _reduce_device(device: torch.device) -> torch.device:
    """Where an all-reduce tensor must live: NCCL (GPU workers) reduces CUDA tensors only."""
    return torch.device(collective_device(dist.get_backend(), str(device)))


def _mean_across_ranks(values: dict[str, float], world_size: int,
                       device: torch.device) -> dict[str, float]:
    if world_size == 1 or not dist.is_initialized():
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                          device=_reduce_device(device))
    dist.all_reduce(packed)
    return dict(zip(keys, (packed / world_size).tolist(), strict=True))


def _sum_across_ranks(value: float, world_size: int,
                      device: torch.device) -> float:
    if world_size == 1 or not dist.is_initialized():
        return value
    packed = torch.tensor([value], dtype=torch.float64, device=_reduce_device(device))
    dist.all_reduce(packed)
    return float(packed.item())


def export_hf(engine: TrainEngine, folder: Path, rank: int, tokenizer_src: str | None,
              dtype: torch.dtype | None = None) -> None:
    """HF-format export (safetensors): loadable by transformers and vLLM. Collective.

    `dtype` (bf16 training: torch.bfloat16): floating weights are written in it, and config.json
    says so, whatever the engine holds (torch DDP keeps fp32 master weights; DeepSpeed's bf16
    module is bf16 already): the engines and the evaluator load a bf16 checkpoint, half the
    bytes to write, copy and read. The exact fp32 state for resuming is the engine's own
    (`TrainEngine.save`)."""
    state_dict = engine.full_state_dict()
    if rank == 0:
        if dtype is not None and state_dict is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                          for k, v in state_dict.items()}
        engine.module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        if dtype is not None:
            _set_config_dtype(folder / "config.json", str(dtype).removeprefix("torch."))
        if tokenizer_src is not None:
            load_tokenizer(tokenizer_src).save_pretrained(folder)


def _set_config_dtype(config: Path, name: str) -> None:
    """save_pretrained writes the module's parameter dtype; the export's is `name`."""
    data = json.loads(config.read_text())
    for node in (data, data.get("backbone_config")):  # the value model nests its backbone's
        if isinstance(node, dict):
            node["dtype"] = name
            node.pop("torch_dtype", None)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass
class Models:
    """One worker's engines (policy; value model for dqo / dro) and frozen pi_ref (for the
    KL term): built once, then trained round after round in place."""

    engines: dict[str, TrainEngine]
    reference: torch.nn.Module | None
    export_dtype: torch.dtype | None  # HF exports (bf16 training: bf16)


def build_models(cfg: Config, policy_path: str, device: torch.device) -> Models:
    tcfg, acfg = cfg.trainer, cfg.algo
    kind = resolve_engine_kind(tcfg.engine, cuda=device.type == "cuda")
    dtype = resolve_dtype(cfg.model.dtype, device)
    bf16 = dtype == torch.bfloat16
    attn = attn_implementation(cfg.model.attn_implementation, device)
    policy = load_policy(policy_path, attn=attn)
    engines: dict[str, TrainEngine] = {}
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    engines["policy"] = build_engine(kind, policy.to(device), tcfg.policy_lr, tcfg, bf16)
    if acfg.has_value_model:
        value = load_value(cfg.model.value, policy_path, attn=attn)
        if cfg.model.gradient_checkpointing:
            value.gradient_checkpointing_enable()
        engines["value"] = build_engine(kind, value.to(device), tcfg.value_lr, tcfg, bf16)
    for engine in engines.values():
        engine.module.train()
    reference = None
    if acfg.name == "dqo" and acfg.kl_coef > 0:  # pi_ref's full distribution, for the KL term
        reference = load_policy(cfg.model.reference or policy_path, dtype, attn).to(device)
        reference.eval().requires_grad_(False)
    return Models(engines, reference, torch.bfloat16 if bf16 else None)


def resume(models: Models, folder: Path | None, rank: int = 0) -> TrainState:
    """The state saved in checkpoint `folder` (engines loaded from it), else a fresh one."""
    if folder is None:
        return TrainState()
    for name, engine in models.engines.items():
        engine.load(folder / f"{name}_state")
    state = TrainState.load(folder / STATE_FILE)
    if rank == 0:
        log.info("resumed from %s at step %d (round %d, epoch %d, step %d of it)", folder,
                 state.step, state.round, state.epoch, state.step_in_epoch)
    return state


def run_training(cfg: Config, policy_path: str, io: WorkerIO) -> TrainState:
    """One round: trains until trainer.max_steps global steps are done; returns the state."""
    models = build_models(cfg, policy_path, io.device)
    return train_round(cfg, models, io, resume(models, io.resume_from, io.rank), 0, policy_path)


def train_round(cfg: Config, models: Models, io: WorkerIO, state: TrainState, round: int,
                policy_path: str) -> TrainState:
    """Trains round `round`: global steps round*max_steps+1 .. (round+1)*max_steps, on the
    round's data (`io.batches`), from `state` (the previous round's end, or a checkpoint
    within this round). At a fresh round the LR schedule restarts and, with
    trainer.optimizer_across_rounds=reset, Adam's moments too; weights (fp32 master copies
    included) always carry over. Returns the state at the round's end."""
    tcfg, acfg, engines = cfg.trainer, cfg.algo, models.engines
    round_start, end = round * tcfg.max_steps, (round + 1) * tcfg.max_steps
    if state.step >= end:
        return state
    if state.round != round:  # a fresh round: its own data, epochs counted from 0
        if state.step != round_start:
            raise RuntimeError(f"round {round} starts at step {round_start}, but the trainer "
                               f"is at step {state.step} of round {state.round}")
        for engine in engines.values():
            engine.restart_schedule(clear_moments=tcfg.optimizer_across_rounds == "reset")
        state = TrainState(step=state.step, round=round, rows=state.rows, tokens=state.tokens)

    resumed_from = state.step
    rows_per_step = tcfg.micro_batch_size * tcfg.grad_accum_steps * io.world_size
    window: list[dict[str, float]] = []
    window_start, wait_total, window_tokens = time.perf_counter(), 0.0, 0
    run_start, start_step = time.perf_counter(), state.step
    while state.step < end:
        wait_start = time.perf_counter()  # asking for the epoch's split waits for its build
        stream = io.batches(state.epoch, state.step_in_epoch)
        wait_total += time.perf_counter() - wait_start
        progressed = False
        while state.step < end:
            wait_start = time.perf_counter()
            try:
                micro_batches = next(stream)
            except StopIteration:
                break
            wait_total += time.perf_counter() - wait_start
            progressed = True
            train_policy = ("value" not in engines
                            or state.step - round_start >= tcfg.value_warmup_steps)
            step_metrics, tokens = _train_step(engines, micro_batches, acfg, io.device,
                                               train_policy, models.reference)
            if io.ledger is not None:
                record = {"step": state.step + 1, "round": round, "epoch": state.epoch,
                          "time": time.time()}
                for key in ("positions", "order_key"):
                    record[key] = [v for m in micro_batches for v in m[key].tolist()]
                append_jsonl(io.ledger / f"rank{io.rank}.jsonl", record)
            state.step += 1
            state.step_in_epoch += 1
            state.rows += rows_per_step
            step_tokens = int(_sum_across_ranks(tokens, io.world_size, io.device))
            state.tokens += step_tokens
            window_tokens += step_tokens
            window.append(step_metrics)

            local = state.step - round_start
            checkpoint = local % tcfg.checkpoint_every == 0 or state.step == end
            if local % tcfg.log_every == 0 or checkpoint:
                elapsed = time.perf_counter() - window_start
                metrics = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                metrics["data_wait_frac"] = wait_total / max(elapsed, 1e-9)
                metrics = _mean_across_ranks(metrics, io.world_size, io.device)
                rate = (state.step - start_step) / max(time.perf_counter() - run_start, 1e-9)
                metrics.update(step=state.step, round=round, epoch=state.epoch, rows=state.rows,
                               resumed_from=resumed_from,
                               tokens=state.tokens, steps_per_s=len(window) / elapsed,
                               step_s=elapsed, tokens_per_s=window_tokens / elapsed,
                               lr_policy=engines["policy"].lr(),
                               eta_s=(end - state.step) / max(rate, 1e-9))
                if "value" in engines:
                    metrics["lr_value"] = engines["value"].lr()
                saving = time.perf_counter()
                folder = (_save_checkpoint(engines, state, io, policy_path, models.export_dtype)
                          if checkpoint else None)
                if io.rank == 0:
                    log.info("round %d step %d/%d epoch %d loss %.4f | %.2f steps/s, data wait "
                             "%.1f%%, ETA %.0fs", round, local, tcfg.max_steps, state.epoch,
                             metrics["loss"], metrics["steps_per_s"],
                             100 * metrics["data_wait_frac"], metrics["eta_s"])
                io.report(metrics, folder)
                if io.log_metrics is not None:  # after report: a line with checkpoint=true
                    io.log_metrics({**metrics, "checkpoint": bool(folder),
                                    "checkpoint_s": time.perf_counter() - saving}, state.step)
                window, wait_total, window_tokens = [], 0.0, 0
                window_start = time.perf_counter()
        if not progressed and state.step_in_epoch == 0:  # a fresh epoch, not a finished one
            raise RuntimeError(f"epoch {state.epoch} has no full global step of "
                               f"{rows_per_step} rows: the data set is too small for "
                               "micro_batch_size * grad_accum_steps * num_workers")
        if state.step < end:
            state.epoch += 1
            state.step_in_epoch = 0
    return state


def _train_step(engines: dict[str, TrainEngine], micro_batches: list[Batch], acfg: AlgoConfig,
                device: torch.device, train_policy: bool,
                reference: torch.nn.Module | None = None) -> tuple[dict[str, float], int]:
    """One optimizer step over grad_accum micro-batches; returns (mean metrics, tokens).
    train_policy=False (value warm-up) leaves the policy engine untouched: no backward and no
    step, so neither its weights nor its optimizer/schedule state move."""
    metrics: dict[str, float] = {}
    tokens = 0
    training = {name: e for name, e in engines.items() if name != "policy" or train_policy}
    for micro in micro_batches:
        batch = {k: v.to(device) for k, v in micro.items()}
        out = loss_on_batch(engines["policy"], engines.get("value"), batch, acfg, reference,
                            train_policy)
        # The two losses reach disjoint parameters, so each engine backpropagates its own.
        if train_policy:
            engines["policy"].backward(out.policy_loss)
        if "value" in engines and out.value_loss is not None:
            engines["value"].backward(out.value_loss)
        for engine in training.values():
            engine.step()  # updates only at the accumulation boundary
        tokens += int(batch["response_mask"].sum())
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / len(micro_batches)
    return metrics, tokens


def _save_checkpoint(engines: dict[str, TrainEngine], state: TrainState, io: WorkerIO,
                     policy_path: str, export_dtype: torch.dtype | None = None) -> Path:
    """DeepSpeed/torch state for exact resume (every trainer.checkpoint_every steps and the
    last) + HF exports in `export_dtype` (the training dtype: bf16 on GPUs);
    trainer_state.json written last."""
    folder = io.scratch / f"rank{io.rank}" / f"checkpoint-{state.step:07d}"
    with writing(folder, f"checkpoint {state.step} (rank {io.rank})"):
        folder.mkdir(parents=True, exist_ok=True)
        for name, engine in engines.items():
            engine.save(folder / f"{name}_state")
        export_hf(engines["policy"], folder / "policy", io.rank, policy_path, export_dtype)
        if "value" in engines:
            export_hf(engines["value"], folder / "value", io.rank, None, export_dtype)
        if io.rank == 0:
            state.save(folder / STATE_FILE)
    return folder
