"""Picks and builds a generation engine: vLLM where it imports, HF generate otherwise (only
on a CPU: on CUDA a missing vLLM is an error). Apart from the interface (`base`) so that the
implementations, which import `base`, are not imported back by it."""

from __future__ import annotations

import logging

from actors.engines.base import GenerationEngine
from dqo_ray.device import EngineUnavailable

log = logging.getLogger(__name__)

ENGINE_KINDS = ("auto", "vllm", "hf")


def vllm_import_error() -> str | None:
    """Why vLLM does not import here, or None when it does."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # an ImportError, or a broken build (CUDA vllm on a CPU box)
        log.debug("vllm not importable: %r", exc)
        return repr(exc)
    return None


def vllm_importable() -> bool:
    return vllm_import_error() is None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_engine(kind: str, cuda: bool, vllm_error: str | None) -> tuple[str, str]:
    """(engine, why) for `kind` on a process with or without CUDA, where vLLM imports
    (`vllm_error` None) or not. On CUDA a missing vLLM is an error naming it, never a silent
    fall back to HF generate; only `auto` on a CPU falls back (the caller logs a warning)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine kind {kind!r} is not one of {', '.join(ENGINE_KINDS)}")
    if kind == "hf":
        return "hf", "requested"
    if vllm_error is None:
        return "vllm", "requested" if kind == "vllm" else "vllm imports"
    if kind == "vllm" or cuda:
        where = "on this CUDA machine" if cuda else "here"
        raise EngineUnavailable(
            f"generation engine {kind} ({'vLLM' if kind == 'vllm' else 'auto -> vLLM'}): vLLM "
            f"does not import {where} ({vllm_error}); install vLLM, or set engine: hf "
            "explicitly to use HF generate")
    return "hf", f"vllm does not import: {vllm_error}"


def make_engine(kind: str, model_path: str, *, dtype: str = "auto", kv_cache_gb: float = 1.0,
                seed: int = 0, tensor_parallel: int = 1,
                gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                max_num_seqs: int | None = None, in_process: bool | None = None,
                cuda: bool | None = None) -> GenerationEngine:
    """`kind`: "vllm", "hf", or "auto" (vLLM where it imports; HF only on a CPU, with a
    warning). `dtype`: model.dtype, `auto` = bfloat16 on CUDA, float32 on CPU
    (`dqo_ray.device`). gpu_memory_utilization, max_model_len, max_num_seqs: vLLM's memory
    settings (generation.*; HF generate has none). `in_process`: generation.vllm_in_process.
    `cuda`: whether this process has CUDA
    (default: torch says)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine kind {kind!r} is not one of {', '.join(ENGINE_KINDS)}")
    cuda = cuda_available() if cuda is None else cuda
    vllm_error = None
    if kind != "hf" and not vllm_importable():
        vllm_error = vllm_import_error() or "no vllm"
    chosen, reason = choose_engine(kind, cuda, vllm_error)
    if kind == "auto" and chosen == "hf":
        log.warning("generation engine: hf (%s; kind=auto, no CUDA: the slow fallback) for %s",
                    reason, model_path)
    else:
        log.info("generation engine: %s (%s; kind=%s) for %s", chosen, reason, kind,
                 model_path)
    if chosen == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=dtype, kv_cache_gb=kv_cache_gb, seed=seed,
                          tensor_parallel=tensor_parallel,
                          gpu_memory_utilization=gpu_memory_utilization,
                          max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          in_process=in_process)
    from actors.engines.hf import HFEngine

    if tensor_parallel != 1:
        log.warning("HF engine ignores tensor_parallel=%d (single device)", tensor_parallel)
    return HFEngine(model_path, dtype=dtype, seed=seed)
