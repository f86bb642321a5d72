"""Training engines behind one small interface: DeepSpeed (ZeRO 0-3) or plain torch (DDP).

An engine owns one model, its optimizer and LR schedule. The loop calls, per micro-batch,
`engine(...)` (forward), `engine.backward(loss)` and `engine.step()`; the optimizer update
happens once every `grad_accum_steps` micro-batches, with gradient clipping. Policy and value
get one engine each, so they have separate learning rates, schedules and optimizer states.
`trainer.engine: auto` picks DeepSpeed; only a CPU worker may fall back to torch (a warning):
on a GPU worker, and whenever DeepSpeed is asked for by name, a DeepSpeed that does not import
is an error. bf16 keeps fp32 master weights in both engines (DeepSpeed's bf16 optimizer; torch:
fp32 parameters and AdamW state, bf16 autocast forward).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from dqo_ray.config import TrainerConfig
from dqo_ray.device import EngineUnavailable, choose_device
from dqo_ray.train.schedule import lr_at

log = logging.getLogger(__name__)


class TrainEngine(Protocol):
    module: nn.Module

    def __call__(self, **inputs: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def lr(self) -> float: ...
    def save(self, path: str | os.PathLike) -> None: ...  # collective: every rank calls
    def load(self, path: str | os.PathLike) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor] | None: ...  # collective; rank 0 gets it
    def restart_schedule(self, clear_moments: bool) -> None: ...  # a new round's first step


def import_deepspeed(cuda: bool) -> Any:
    """Imports DeepSpeed for a process that trains on CUDA (`cuda`) or on the CPU.

    DeepSpeed picks its accelerator once, at its first import, from DS_ACCELERATOR: it is set
    here from what this process has (never inherited from the driver, which may be a CPU
    machine), and the accelerator DeepSpeed ends up with is checked."""
    want = choose_device(cuda).ds_accelerator
    if os.environ.get("DS_ACCELERATOR") != want:
        log.info("DS_ACCELERATOR=%s (was %s): this process trains on %s", want,
                 os.environ.get("DS_ACCELERATOR"), "CUDA" if cuda else "the CPU")
        os.environ["DS_ACCELERATOR"] = want
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as exc:  # an ImportError, or a broken build (missing CUDA libraries)
        raise EngineUnavailable(f"DeepSpeed does not import: {exc!r}") from exc
    have = get_accelerator().device_name()
    if have != want:
        raise RuntimeError(f"DeepSpeed runs on the {have!r} accelerator but this process trains "
                           f"on {want!r}: DeepSpeed was imported before DS_ACCELERATOR was set (transformers "
                           "imports it when it loads a model: set it before, from "
                           "dqo_ray.device.choose_device)")
    return deepspeed


def resolve_engine_kind(kind: str, cuda: bool = False) -> str:
    """trainer.engine -> "deepspeed" or "torch". A DeepSpeed that does not import is an error
    naming it, except for `auto` on a CPU worker, which falls back to torch (logged)."""
    if kind == "torch":
        return kind
    try:
        import_deepspeed(cuda)
    except EngineUnavailable as exc:
        if kind == "deepspeed" or cuda:
            where = "a GPU worker" if cuda else "this worker"
            raise EngineUnavailable(
                f"trainer.engine={kind}: {exc} on {where}; install DeepSpeed there, or set "
                "trainer.engine: torch (plain torch DDP) explicitly") from exc
        log.warning("trainer.engine=auto: %s; training with plain torch DDP on the CPU", exc)
        return "torch"
    if kind == "auto":
        log.info("trainer.engine=auto: using DeepSpeed (%s)", "CUDA" if cuda else "CPU")
    return "deepspeed"


def _optimizer_and_schedule(model: nn.Module, lr: float, cfg: TrainerConfig):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    # lr=1.0: the multiplier of `lr`; cfg.max_steps is one past the last step, which keeps a
    # little learning rate.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
        s, 1.0, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule))
    return optimizer, schedule


def _restart(optimizer: torch.optim.Optimizer, schedule: Any, clear_moments: bool) -> None:
    """The LR schedule from its step 0 again (as a new scheduler would start), and with
    `clear_moments` Adam's state dropped (AdamW re-creates it at the next step)."""
    if clear_moments:
        optimizer.state.clear()
    schedule.last_epoch = -1
    with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        schedule.step()


SHM_OP = "deepspeed_shm_comm"


def clear_stale_build_lock(name: str = SHM_OP, built_grace_s: float = 60.0,
                           building_grace_s: float = 900.0) -> bool:
    """Removes a JIT extension build lock left by a killed process; True when it did.

    DeepSpeed's CPU backend loads its shared-memory op through torch's JIT extension loader
    at every start, which holds a lock file (FileBaton) while it checks the build. A process
    killed inside that window (a stopped job, a killed worker) leaves the lock behind, and
    every later start waits on it forever. The lock is taken as stale when the op is already
    built and the lock is older than `built_grace_s` (the up-to-date check takes well under a
    second), or when nothing is built and it is older than `building_grace_s`.
    """
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(name, verbose=False))
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    built = (folder / f"{name}.so").exists()
    if age < (built_grace_s if built else building_grace_s):
        return False
    log.warning("removing a stale build lock %s (%.0fs old, left by a killed process)", lock,
                age)
    lock.unlink(missing_ok=True)
    return True


def deepspeed_config(cfg: TrainerConfig, bf16: bool) -> dict[str, Any]:
    """DeepSpeed's config for one trained model. With bf16, gradients are summed over
    micro-batches and reduced across ranks in fp32: DeepSpeed's default for both is the
    model's bf16, whose 8-bit mantissa drops small contributions. bf16 needs ZeRO >= 1 (the
    fp32 master weights live in ZeRO's optimizer; Config refuses stage 0 with bf16)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # the loop reports metrics itself
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


class DeepSpeedTrainEngine:
    def __init__(self, model: nn.Module, lr: float, cfg: TrainerConfig, bf16: bool) -> None:
        cuda = next(model.parameters()).device.type == "cuda"
        deepspeed = import_deepspeed(cuda)
        if not cuda:
            clear_stale_build_lock()
        optimizer, schedule = _optimizer_and_schedule(model, lr, cfg)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=schedule,
                                               config=deepspeed_config(cfg, bf16))
        self.module = self.engine.module
        self.zero_stage = cfg.zero_stage
        self.schedule = schedule

    def __call__(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum_steps itself

    def step(self) -> None:
        self.engine.step()  # applies the update only at accumulation boundaries

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, path: str | os.PathLike) -> None:
        self.engine.save_checkpoint(str(path), tag="ds")

    def load(self, path: str | os.PathLike) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag="ds")
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero_stage == 3:  # parameters are partitioned: gather (collective)
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()

    def restart_schedule(self, clear_moments: bool) -> None:
        # The torch AdamW inside DeepSpeed's wrapper (ZeRO / bf16) holds the moments.
        wrapped = self.engine.optimizer
        _restart(getattr(wrapped, "optimizer", wrapped), self.schedule, clear_moments)


class TorchTrainEngine:
    """Plain torch with DDP when a process group exists; same semantics as the DeepSpeed one.

    bf16 = mixed precision: parameters, gradients and AdamW state stay fp32 (the master copy;
    AdamW on bf16 weights loses updates smaller than the weight's 8-bit mantissa), the forward
    runs under bf16 autocast."""

    def __init__(self, model: nn.Module, lr: float, cfg: TrainerConfig,
                 bf16: bool = False) -> None:
        self.module = model.float() if bf16 else model
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.model = nn.parallel.DistributedDataParallel(model) if distributed else model
        self.optimizer, self.schedule = _optimizer_and_schedule(model, lr, cfg)
        self.cfg, self.micro_steps, self.bf16 = cfg, 0, bf16

    def __call__(self, **inputs: Any) -> Any:
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum_steps).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.cfg.grad_accum_steps:
            return
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.schedule.get_last_lr()[0])

    def save(self, path: str | os.PathLike) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return  # replicas are identical under DDP
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(), "micro_steps": self.micro_steps},
                   Path(path) / "torch_state.pt")

    def load(self, path: str | os.PathLike) -> None:
        # Tensors and plain containers only: a crafted file cannot run code when loaded.
        state = torch.load(Path(path) / "torch_state.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.micro_steps = state["micro_steps"]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.module.state_dict()

    def restart_schedule(self, clear_moments: bool) -> None:
        _restart(self.optimizer, self.schedule, clear_moments)


def build_engine(kind: str, model: nn.Module, lr: float, cfg: TrainerConfig,
                 bf16: bool = False) -> TrainEngine:
    if kind == "deepspeed":
        return DeepSpeedTrainEngine(model, lr, cfg, bf16)
    return TorchTrainEngine(model, lr, cfg, bf16)


def init_single_process_group() -> None:
    """A world of one (gloo) for running the loop without Ray, e.g. in benchmarks."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads these
    dist.init_process_group("gloo", rank=0, world_size=1)
