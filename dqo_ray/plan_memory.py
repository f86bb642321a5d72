"""Per-GPU memory estimates for the plan; `check_memory` turns them into its problems. Pure: no
Ray, no torch.

Memory (per GPU, GiB; rough, for refusing what cannot fit, not for tuning):
- trainer: per trained model (policy; value model for dqo/dro; pi_ref for algo.kl_coef > 0,
  weights only) weights + gradients + optimizer state under the ZeRO stage over
  trainer.num_workers ranks (bf16: 2 + 2 + 12 bytes per parameter, fp32 master weights and Adam
  moments; fp32: 4 + 4 + 8), activations for micro_batch_size x (max_prompt_tokens +
  max_response_tokens) tokens (one checkpoint per layer with gradient checkpointing, else
  ~34 bytes x hidden per token per layer), the policy's logits (8 bytes per token x vocab:
  bf16 logits, their fp32 copy kept for the backward, their gradient) and a fixed overhead.
- generator / evaluator: vLLM takes gpu_memory_utilization of each GPU; weights (over tensor
  parallel ranks) and ~2 GiB of activations come first, the KV cache gets the rest, and must
  hold at least one max_model_len sequence.
- reference: bf16 weights + one batch's logits + overhead, on an engine's GPU beside vLLM:
  within the (1 - gpu_memory_utilization) share vLLM leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dqo_ray.clusters import Ask, Cluster, GPUKind, format_number
from dqo_ray.model_shapes import ModelShape

if TYPE_CHECKING:
    from dqo_ray.config import Config

GIB = 2**30


@dataclass
class Memory:
    role: str
    parts: dict[str, float]
    """GiB per GPU, by what holds it."""
    budget: float
    """GiB the role may use on one GPU."""
    gpu: GPUKind
    note: str = ""

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items() if v >= 0.05)
        return (f"{self.role}: {self.total:.1f} of {self.budget:.1f} GiB per {self.gpu.name} "
                f"({parts}){' ' + self.note if self.note else ''}")


TRAIN_OVERHEAD_GIB = 3.0
"""CUDA context, NCCL and ZeRO communication buffers, allocator fragmentation."""
ENGINE_ACTIVATIONS_GIB = 2.0
"""vLLM's profiled activation peak and CUDA graphs, before its KV cache (1-3 GiB for small
models at default batch sizes)."""
REFERENCE_OVERHEAD_GIB = 1.5


def _dtype_bytes(cfg: Config) -> int:
    return 4 if cfg.model.dtype == "float32" else 2  # auto = bf16 on a GPU


def trainer_memory(cfg: Config, shape: ModelShape, gpu: GPUKind) -> Memory:
    t, bf16 = cfg.trainer, _dtype_bytes(cfg) == 2
    n = t.num_workers
    stage = 0 if t.engine == "torch" else t.zero_stage
    if t.engine == "torch":  # fp32 master weights and grads, bf16 only in autocast
        w_bytes, g_bytes, o_bytes = 4, 4, 8
    else:
        w_bytes, g_bytes, o_bytes = (2, 2, 12) if bf16 else (4, 4, 8)
    trained = shape.params + (shape.backbone_params if cfg.algo.has_value_model else 0)
    weights = trained * w_bytes / (n if stage == 3 else 1)
    grads = trained * g_bytes / (n if stage >= 2 else 1)
    optim = trained * o_bytes / (n if stage >= 1 else 1)
    if cfg.algo.name == "dqo" and cfg.algo.kl_coef > 0:  # pi_ref beside the policy, frozen
        weights += shape.params * _dtype_bytes(cfg)
    tokens = t.micro_batch_size * (cfg.data.max_prompt_tokens + cfg.data.max_response_tokens)
    models = 2 if cfg.algo.has_value_model else 1
    per_layer_full = 34 * tokens * shape.hidden  # bytes, 16-bit activations, fused attention
    if cfg.model.gradient_checkpointing:
        acts = models * (shape.layers * 2 * tokens * shape.hidden + per_layer_full)
    else:
        acts = models * shape.layers * per_layer_full
    logits = 8 * tokens * shape.vocab
    if cfg.algo.name == "dqo" and cfg.algo.kl_coef > 0:
        logits += 8 * tokens * shape.vocab  # the full-vocabulary KL's fp32 log-softmaxes
    parts = {"weights": weights / GIB, "gradients": grads / GIB, "optimizer": optim / GIB,
             "activations": acts / GIB, "logits": logits / GIB, "overhead": TRAIN_OVERHEAD_GIB}
    if cfg.generation.weight_transfer != "object_store":  # GPUs: auto = broadcast
        # rank 0 broadcasts the round's policy one tensor at a time; the largest is the
        # embedding (untied models hold two of that size, sent one after the other)
        parts["weights to broadcast"] = shape.vocab * shape.hidden * _dtype_bytes(cfg) / GIB
    return Memory("trainer", parts, gpu.memory_gib, gpu,
                  f"[{train_engine_name(cfg)} over {n} worker(s), micro-batch "
                  f"{t.micro_batch_size} x "
                  f"{cfg.data.max_prompt_tokens + cfg.data.max_response_tokens} tokens"
                  f"{', gradient checkpointing' if cfg.model.gradient_checkpointing else ''}]")


@dataclass
class EngineMemory:
    memory: Memory
    kv_tokens: int
    max_model_len: int
    sequence_tokens: int


def engine_memory(cfg: Config, shape: ModelShape, gpu: GPUKind, role: str, tensor_parallel: int,
                  max_new_tokens: int) -> EngineMemory:
    g = cfg.generation
    budget = g.gpu_memory_utilization * gpu.memory_gib
    weights = shape.params * _dtype_bytes(cfg) / tensor_parallel / GIB
    kv = max(0.0, budget - weights - ENGINE_ACTIVATIONS_GIB)
    kv_tokens = int(kv * GIB / (shape.kv_bytes_per_token(_dtype_bytes(cfg)) / tensor_parallel))
    parts = {"weights": weights, "activations": ENGINE_ACTIVATIONS_GIB, "KV cache": kv}
    length = g.max_model_len or shape.max_positions
    memory = Memory(role, parts, budget, gpu,
                    f"[gpu_memory_utilization {g.gpu_memory_utilization} of "
                    f"{format_number(gpu.memory_gib)} GiB; KV cache {kv_tokens:,} tokens"
                    + (f", tensor parallel {tensor_parallel}" if tensor_parallel > 1 else "")
                    + "]")
    return EngineMemory(memory, kv_tokens, length, cfg.data.max_prompt_tokens + max_new_tokens)


def reference_memory(cfg: Config, shape: ModelShape, gpu: GPUKind) -> Memory:
    tokens = cfg.data.ref_batch_size * (cfg.data.max_prompt_tokens + cfg.data.max_response_tokens)
    parts = {"weights": shape.params * 2 / GIB,  # the scorer loads pi_ref in bf16 on a GPU
             "logits": (2 * tokens * shape.vocab + 4 * 4096 * shape.vocab) / GIB,
             "overhead": REFERENCE_OVERHEAD_GIB}
    # pi_ref lives in each engine actor, beside vLLM: in the share vLLM leaves free.
    budget = (1 - cfg.generation.gpu_memory_utilization) * gpu.memory_gib
    return Memory("reference", parts, budget, gpu,
                  f"[batch {cfg.data.ref_batch_size}, beside vLLM: 1 - gpu_memory_utilization "
                  f"{cfg.generation.gpu_memory_utilization} of "
                  f"{format_number(gpu.memory_gib)} GiB]")


def train_engine_name(cfg: Config) -> str:
    if cfg.trainer.engine == "torch":
        return "torch DDP"
    return f"DeepSpeed ZeRO {cfg.trainer.zero_stage}"


def _gpu_of(cluster: Cluster, gpus: int) -> GPUKind | None:
    """The smallest-memory GPU kind among nodes with `gpus` GPUs (the one a role may land on)."""
    kinds = [n.gpu for n in cluster.nodes if n.gpus >= gpus and n.gpu and n.gpu.memory_gib]
    return min(kinds, key=lambda k: k.memory_gib) if kinds else None


def check_memory(cfg: Config, cluster: Cluster, shape: ModelShape | None,
                 asks: Mapping[str, Ask], problems: list[str], notes: list[str]
                 ) -> list[Memory]:
    """Per-GPU estimates of the roles `asks` places on GPUs; appends to `problems` what does
    not fit (the role, the numbers, what to change) and to `notes` what is not estimated."""
    if not any(a.gpus for a in asks.values()):
        return []
    if shape is None:
        notes.append(f"model.policy {cfg.model.policy!r}: size unknown, GPU memory not "
                     "estimated")
        return []
    out: list[Memory] = []
    hints = {"trainer": "raise trainer.zero_stage, set model.gradient_checkpointing: true, or "
                        "lower trainer.micro_batch_size",
             "reference": "lower data.ref_batch_size or generation.gpu_memory_utilization"}
    for role in ("trainer", "reference"):
        ask = asks["generator" if role == "reference" and "generator" in asks else role]
        gpu = _gpu_of(cluster, 1) if ask.gpus else None
        if gpu is None:
            continue
        m = trainer_memory(cfg, shape, gpu) if role == "trainer" else \
            reference_memory(cfg, shape, gpu)
        out.append(m)
        if m.total > m.budget:
            problems.append(f"{role}: needs about {m.total:.1f} GiB per GPU "
                            f"({', '.join(f'{k} {v:.1f}' for k, v in m.parts.items())}), "
                            f"more than the {format_number(round(m.budget, 1))} GiB "
                            f"{'left beside vLLM on' if role == 'reference' else 'of'} an "
                            f"{m.gpu.name}: "
                            f"{hints[role]}")
    engines = []
    if "generator" in asks and asks["generator"].gpus:
        engines.append(("generator", cfg.generation.engine, asks["generator"].gpus,
                        cfg.generation.max_new_tokens))
    if asks["evaluator"].gpus:  # its engine runs without tensor parallelism
        engines.append(("evaluator", cfg.eval.engine, 1, cfg.eval.max_new_tokens))
    hf = [role for role, kind, _, _ in engines if kind == "hf"]
    if hf:  # HF generate has no KV-cache budget to check
        notes.append(f"{' and '.join(hf)}: engine hf on GPUs, memory not estimated")
    engines = [(role, tp, new) for role, kind, tp, new in engines if kind != "hf"]
    for role, tp, new_tokens in engines:
        gpu = _gpu_of(cluster, tp)
        if gpu is None:
            continue
        e = engine_memory(cfg, shape, gpu, role, tp, new_tokens)
        out.append(e.memory)
        weights = e.memory.parts["weights"] + e.memory.parts["activations"]
        if e.kv_tokens < e.max_model_len:
            what = ("the weights and activations take all of it" if weights >= e.memory.budget
                    else f"its KV cache holds {e.kv_tokens:,} tokens")
            problems.append(
                f"{role}: vLLM's share of an {gpu.name} is {e.memory.budget:.1f} GiB "
                f"(generation.gpu_memory_utilization {cfg.generation.gpu_memory_utilization}"
                f" x {format_number(gpu.memory_gib)} GiB) and {what}, less than one sequence of "
                f"max_model_len {e.max_model_len:,} tokens (weights {e.memory.parts['weights']:.1f}"
                " GiB): lower generation.max_model_len, raise gpu_memory_utilization"
                + (" or generation.gpus_per_engine" if role == "generator" else ""))
            continue
        if role == "generator":
            g = cfg.generation
            batch = g.chunk_prompts * g.samples_per_prompt
            held = e.kv_tokens // max(1, e.sequence_tokens)
            if g.max_num_seqs and batch < g.max_num_seqs:
                notes.append(f"generator: an engine is handed {batch} sequences at a time "
                             f"(chunk_prompts {g.chunk_prompts} x samples_per_prompt "
                             f"{g.samples_per_prompt}), fewer than max_num_seqs "
                             f"{g.max_num_seqs}: raise generation.chunk_prompts to fill it")
            if held < min(batch, g.max_num_seqs or batch):
                notes.append(f"generator: the KV cache holds {held} full-length sequences of "
                             f"{e.sequence_tokens} tokens, fewer than the {batch} an engine is "
                             "handed: vLLM will queue the rest")
    return out
