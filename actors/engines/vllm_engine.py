"""Generation with an in-process `vllm.LLM` (the default engine wherever vLLM imports).

Behaviour log-probs: vLLM V1 returns RAW log-probs by default (log_softmax of the logits before
temperature and top-p), which is not the distribution sampled from. The engine is built with
`logprobs_mode="processed_logprobs"` (vllm/config/model.py): the sampler then returns
log_softmax of the logits after temperature and top-k/top-p masking (vllm/v1/sample/sampler.py
`Sampler.sample`, vllm/v1/sample/ops/topk_topp_sampler.py `forward_cpu`/`forward_native`), i.e.
of exactly the distribution the token was drawn from, renormalised over the nucleus. For an
all-greedy batch it is log_softmax of the untempered logits. `SamplingParams(logprobs=0)` asks
for the sampled token's log-prob only. tests/test_engines.py checks both against an HF forward.

Weight refresh without restart: the workers' `reload_weights`, from a checkpoint folder or from
the trainer's safetensors bytes (no disk: `weights_iterator`), then (on CPU, tied embeddings)
re-packing the LM head, see `DQOWorkerExtension`; then `reset_prefix_cache()` (without it,
cached KV blocks computed by the old weights are reused). On GPUs the trainer broadcasts
instead (`generation.weight_transfer`, `dqo_ray.models.weight_broadcast`): each worker joins
the refresh's group and loads the tensors as they arrive; the bytes through Ray's object store
and vLLM's RPC would be copies.

Scripts that start this engine need the `if __name__ == "__main__":` guard (vLLM may spawn).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from actors.engines.base import (
    Sample,
    SamplingSpec,
    WeightSource,
    describe_weights,
    local_checkpoint,
    materialise,
)
from dqo_ray.device import resolve_dtype_name
from dqo_ray.io import is_uri
from dqo_ray.models.weight_broadcast import BroadcastSeat, receive_weights

log = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logprobs"


class DQOWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`), so that the weight refresh runs
    by name through `collective_rpc` (no pickled callables: works with the multiprocess
    engine without VLLM_ALLOW_INSECURE_SERIALIZATION)."""

    def dqo_reload_weights(self, weights_path: str | None = None, blob: bytes | None = None,
                           seat: BroadcastSeat | None = None) -> int:
        """`reload_weights`, then the post-load processing of embedding / LM-head layers again.

        With tied embeddings the checkpoint holds no lm_head weight, so the in-place reload
        skips that layer ("ParallelLMHead: Failed to load weights"); on CPU its matmul uses a
        packed copy of the weight made at load time, which still holds the OLD embeddings:
        logits then come from the new body through the old head (measured: log-probs equal
        that hybrid within 1.5e-6 and are off the new model by ~3). Re-dispatching is
        idempotent and a no-op on GPU. Returns the number of layers re-processed."""
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
        )

        if seat is not None:  # broadcast by the trainer (NCCL on GPUs)
            # self.rank: this worker's rank among the engine's tensor-parallel workers
            self.reload_weights(weights_iterator=receive_weights(
                seat.offer, seat.first_rank + self.rank, seat.world, self.device))
        elif blob is not None:  # the trainer's weights, handed over in memory
            from safetensors.torch import load

            self.reload_weights(weights_iterator=iter(load(blob).items()))
        else:
            self.reload_weights(weights_path=weights_path)
        count = 0
        for module in self.model_runner.get_model().modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
                count += 1
        return count


def llm_arguments(model: str, dtype: str, seed: int, tensor_parallel: int,
                  on_cpu: bool, *, gpu_memory_utilization: float | None = None,
                  max_model_len: int | None = None,
                  max_num_seqs: int | None = None) -> dict[str, Any]:
    """The `vllm.LLM` arguments of an engine (pure: no vLLM import). The memory settings
    (generation.gpu_memory_utilization, max_model_len, max_num_seqs) are passed when set;
    gpu_memory_utilization only on a GPU (on a CPU the KV cache is VLLM_CPU_KVCACHE_SPACE)."""
    kwargs: dict[str, Any] = dict(
        model=model, dtype=resolve_dtype_name(dtype, cuda=not on_cpu), seed=seed,
        tensor_parallel_size=tensor_parallel, logprobs_mode=LOGPROBS_MODE,
        enforce_eager=on_cpu, worker_extension_cls=f"{__name__}.DQOWorkerExtension")
    if gpu_memory_utilization is not None and not on_cpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    if tensor_parallel > 1:
        # The TP workers as Ray actors in the engine actor's placement group (captured by
        # GeneratorPool); vLLM's default multiprocessing would start them outside Ray, on
        # GPUs Ray did not give this actor.
        kwargs["distributed_executor_backend"] = "ray"
    if on_cpu:
        # vLLM 0.32 on CPU: when a seeded request's prefill is split across steps (chunked
        # prefill, large batches), vLLM rewinds its generator and crashes with "CPU
        # Generator does not use offset". Without chunked prefill a prompt that does not
        # fit waits for the next step whole, so per-request seeds stay usable.
        kwargs["enable_chunked_prefill"] = False
    return kwargs


MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def multiprocessing_env(in_process: bool | None, on_cpu: bool,
                        environ: Mapping[str, str]) -> dict[str, str]:
    """The environment an engine sets before `vllm.LLM` for generation.vllm_in_process (pure).
    None = in process on a CPU unless the environment already says; on a GPU vLLM's own."""
    if in_process is None:
        if not on_cpu or MULTIPROCESSING_ENV in environ:
            return {}
        in_process = True
    return {MULTIPROCESSING_ENV: "0" if in_process else "1"}


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, *, dtype: str = "auto", kv_cache_gb: float = 1.0,
                 seed: int = 0, tensor_parallel: int = 1,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                 max_num_seqs: int | None = None, in_process: bool | None = None,
                 **llm_kwargs) -> None:
        """kv_cache_gb: KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE, whole GiB, rounded up);
        on GPU gpu_memory_utilization applies (None = vLLM's default). in_process:
        generation.vllm_in_process (`multiprocessing_env`). Extra keyword arguments go to
        `vllm.LLM`."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM
        from vllm.platforms import current_platform

        self._tmp: str | None = None
        local_path = model_path
        if is_uri(model_path):  # kept for the engine's life (it may read tokenizer files later)
            self._tmp = tempfile.mkdtemp(prefix="dqo-vllm-model-")
            local_path = materialise(model_path, self._tmp)
        on_cpu = current_platform.is_cpu()
        os.environ.update(multiprocessing_env(in_process, on_cpu, os.environ))
        if on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gb)))
        kwargs = llm_arguments(local_path, dtype, seed, tensor_parallel, on_cpu,
                               gpu_memory_utilization=gpu_memory_utilization,
                               max_model_len=max_model_len, max_num_seqs=max_num_seqs)
        dtype = kwargs["dtype"]
        kwargs.update(llm_kwargs)
        # An in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, as in tests) initialises a
        # torch.distributed group of one and replaces torch.set_num_threads in this process;
        # `close()` undoes both.
        self._saved_threads = (torch.set_num_threads, torch.get_num_threads())
        dist_before = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.llm = LLM(**kwargs)
        self._owns_dist = (not dist_before and torch.distributed.is_available()
                           and torch.distributed.is_initialized())
        self.tokenizer = self.llm.get_tokenizer()
        self._rng = random.Random(seed)
        log.info("vLLM engine: %s (%s, %s, logprobs_mode=%s)", model_path, dtype,
                 "cpu" if on_cpu else current_platform.device_name, LOGPROBS_MODE)

    def load_weights(self, source: WeightSource) -> None:
        if isinstance(source, bytes):
            self.llm.collective_rpc("dqo_reload_weights", kwargs={"blob": source})
        elif isinstance(source, BroadcastSeat):
            self.llm.collective_rpc("dqo_reload_weights", kwargs={"seat": source})
        else:
            with local_checkpoint(source) as local:
                self.llm.collective_rpc("dqo_reload_weights", kwargs={"weights_path": local})
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        log.info("vLLM engine: weights reloaded from %s", describe_weights(source))

    def _request_seed(self, spec_seed: int, prompt_index: int) -> int:
        # vLLM gives sample j of a request the seed `seed + j`; mixing (spec seed, prompt index)
        # keeps prompts (and calls with nearby seeds) on unrelated random streams.
        return random.Random(spec_seed * 1_000_003 + prompt_index).randrange(2**31)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        base_seed = spec.seed if spec.seed is not None else self._rng.randrange(2**31)
        params = [
            SamplingParams(
                n=spec.n, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                max_tokens=spec.max_new_tokens, logprobs=0,
                seed=None if spec.greedy else self._request_seed(base_seed, i),
                skip_special_tokens=True,
                # vLLM keeps the token that completes a stop string (and drops any after it)
                # and cuts the text before the string: the contract of SamplingSpec.stop.
                stop=list(spec.stop) or None,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                    params, use_tqdm=False)
        results = []
        for out in outputs:
            samples = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(comp.token_ids)
                if comp.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a sample with {comp.finish_reason!r}")
                if comp.logprobs is None or len(comp.logprobs) != len(tokens):
                    raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
                samples.append(Sample(
                    token_ids=tokens, text=comp.text, finish_reason=comp.finish_reason,
                    logprobs=[float(pos[tok].logprob) for tok, pos in
                              zip(tokens, comp.logprobs, strict=True)],
                ))
            results.append(samples)
        return results

    def close(self) -> None:
        """Drops the engine and a temporary local copy of a remote model; for an in-process
        engine, also the process group it created and its torch.set_num_threads override."""
        if self.llm is None:
            return
        self.llm = None
        gc.collect()
        if self._owns_dist:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        set_num_threads, threads = self._saved_threads
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
