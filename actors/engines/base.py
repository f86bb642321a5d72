"""The generation-engine interface: prompts (token ids) in, samples with behaviour log-probs out.

Two implementations: `VLLMEngine` (in-process `vllm.LLM`) and `HFEngine` (transformers
`generate`). Both return, per sampled token, the log-probability under the distribution it was
actually drawn from (docs/algorithm.md section 3.3): softmax(logits / temperature), renormalised over
the top-p nucleus. Greedy decoding (temperature 0) reports the untempered log-probs.

A response that ends with EOS has finish_reason "stop" and keeps the EOS token (and its log-prob)
as its last token; one that ends with a stop string (`SamplingSpec.stop`) has finish_reason
"stop", keeps the token that completed it, and its text ends before it; one cut at
`max_new_tokens` has finish_reason "length".
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dqo_ray.device import EngineUnavailable
from dqo_ray.io import filesystem, is_uri

log = logging.getLogger(__name__)

ENGINE_KINDS = ("auto", "vllm", "hf")


@dataclass
class SamplingSpec:
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0 = greedy (then n must be 1: every sample would be identical)."""
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    """Makes one call reproducible. Pass a different seed per call (e.g. base seed + chunk
    index): the same seed on the same prompt draws the same samples again. None = the engine's
    own random stream (seeded at construction)."""
    stop: tuple[str, ...] = ()
    """Strings that end a response besides EOS (the plain prompt template's next "Question:",
    `dqo_ray.tasks.prompts.stop_strings`). A response ends at the token that completes one:
    finish_reason "stop", that token (and its log-prob) kept as the last one, the text cut
    before the stop string."""

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"n: {self.n} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature: {self.temperature} must be >= 0")
        if self.temperature == 0 and self.n != 1:
            problems.append(f"n: {self.n} must be 1 for greedy decoding (temperature 0)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: {self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: {self.max_new_tokens} must be >= 1")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop: {self.stop!r} must be a sequence of non-empty strings")
        if problems:
            raise ValueError("invalid SamplingSpec: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sample:
    token_ids: list[int]
    """Response tokens; ends with EOS, or the token completing a stop string, when
    finish_reason is "stop"."""
    text: str
    """The response decoded with special tokens (EOS, padding) skipped, and cut before the
    stop string it ended with."""
    finish_reason: str
    """"stop" (ended with EOS or a stop string) or "length" (hit max_new_tokens)."""
    logprobs: list[float]
    """logprobs[i] = log-prob of token_ids[i] under the distribution it was sampled from."""


@runtime_checkable
class GenerationEngine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Sample]]:
        """prompts: token-id lists, already templated. Returns spec.n samples per prompt, in
        prompt order."""
        ...

    def load_weights(self, checkpoint_dir: str) -> None:
        """Refresh the weights in place from an HF checkpoint folder (local path or URI) with
        the same architecture and tokenizer; no restart."""
        ...


def materialise(uri: str, dest: str | os.PathLike) -> str:
    """Copies the top-level files of a checkpoint folder on any pyarrow filesystem (`s3://`,
    `gs://`, `file://`, ...) into the local folder `dest`; returns `dest`. Sub-folders (e.g.
    optimizer state) are skipped: an HF checkpoint is flat."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    files = [info for info in infos if info.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"no files in checkpoint {uri!r}")
    local = pafs.LocalFileSystem()
    for info in files:
        pafs.copy_files(info.path, os.path.join(os.fspath(dest), info.base_name),
                        source_filesystem=fs, destination_filesystem=local)
    log.info("materialised %s (%d files) to %s", uri, len(files), dest)
    return os.fspath(dest)


@contextlib.contextmanager
def local_checkpoint(checkpoint_dir: str | os.PathLike) -> Iterator[str]:
    """Yields a local folder holding the checkpoint: the path itself, or for a URI a temporary
    copy (see `materialise`), deleted on exit."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not is_uri(checkpoint_dir):
        yield checkpoint_dir
        return
    with tempfile.TemporaryDirectory(prefix="dqo-ckpt-") as tmp:
        yield materialise(checkpoint_dir, tmp)


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
                max_num_seqs: int | None = None,
                cuda: bool | None = None) -> GenerationEngine:
    """`kind`: "vllm", "hf", or "auto" (vLLM where it imports; HF only on a CPU, with a
    warning). `dtype`: model.dtype, `auto` = bfloat16 on CUDA, float32 on CPU
    (`dqo_ray.device`). gpu_memory_utilization, max_model_len, max_num_seqs: vLLM's memory
    settings (generation.*; HF generate has none). `cuda`: whether this process has CUDA
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
                          max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    from actors.engines.hf import HFEngine

    if tensor_parallel != 1:
        log.warning("HF engine ignores tensor_parallel=%d (single device)", tensor_parallel)
    return HFEngine(model_path, dtype=dtype, seed=seed)
