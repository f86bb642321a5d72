"""Device, collective backend, dtype and DeepSpeed accelerator: decided in one place from what
a process actually has (CUDA or not). Pure: no torch, no Ray, so every rule is testable on a
machine without a GPU.

    CUDA present  -> device cuda, backend nccl, dtype auto = bfloat16, DS_ACCELERATOR=cuda
    no CUDA       -> device cpu,  backend gloo, dtype auto = float32,  DS_ACCELERATOR=cpu

The caller probes (torch.cuda.is_available(), the GPUs Ray assigned) and passes the answer in.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16")


class EngineUnavailable(RuntimeError):
    """A training or generation engine that cannot start here (its message names it)."""


@dataclass(frozen=True)
class DeviceChoice:
    cuda: bool
    device: str
    """"cuda" or "cpu" (a process with a GPU uses its current CUDA device)."""
    backend: str
    """torch.distributed backend: "nccl" (CUDA tensors only) or "gloo"."""
    dtype: str
    """"bfloat16" or "float32": model.dtype with `auto` resolved."""
    ds_accelerator: str
    """DeepSpeed's DS_ACCELERATOR; read once, at DeepSpeed's first import."""

    @property
    def env(self) -> dict[str, str]:
        """Variables this process needs before DeepSpeed's first import."""
        return {"DS_ACCELERATOR": self.ds_accelerator}


def resolve_dtype_name(name: str, cuda: bool) -> str:
    """`auto` = bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slower, and vLLM's CPU
    path is tested in fp32); an explicit dtype is kept."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    if name == "auto":
        return "bfloat16" if cuda else "float32"
    return name


def choose_device(cuda: bool, dtype: str = "auto") -> DeviceChoice:
    """Everything that follows from whether this process computes on a CUDA device."""
    if cuda:
        return DeviceChoice(True, "cuda", "nccl", resolve_dtype_name(dtype, True), "cuda")
    return DeviceChoice(False, "cpu", "gloo", resolve_dtype_name(dtype, False), "cpu")


def collective_device(backend: str, device: str) -> str:
    """Where a tensor must live for an all-reduce under `backend`: NCCL reduces only CUDA
    tensors (the worker's own `device`), gloo is given CPU tensors."""
    if backend == "nccl":
        if not device.startswith("cuda"):
            raise ValueError(f"the process group's backend is nccl but this worker's device is "
                             f"{device!r}: NCCL needs CUDA tensors (a GPU worker)")
        return device
    return "cpu"


ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")


def resolve_attn_implementation(name: str, cuda: bool, flash_attn: bool) -> str:
    """model.attn_implementation for a process with or without CUDA, where the flash_attn
    package loads (`flash_attn`) or not. auto = flash_attention_2 where it can run (CUDA and
    flash_attn), else sdpa (torch's fused kernels; on CUDA in bf16 they include a flash
    kernel). flash_attention_2 by name where it cannot run is an error naming it."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is not one of "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "auto":
        return "flash_attention_2" if cuda and flash_attn else "sdpa"
    if name == "flash_attention_2" and not (cuda and flash_attn):
        why = "this process has no CUDA device" if not cuda else "flash_attn does not load"
        raise EngineUnavailable(f"model.attn_implementation=flash_attention_2: {why}; install "
                                "flash-attn on the GPU nodes, or set it to auto or sdpa")
    return name
