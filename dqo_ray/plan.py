"""The run's plan: what each role asks Ray for, a per-GPU memory estimate, and whether a cluster
holds them at once. Pure: no Ray, no torch. `python -m jobs.plan` prints it; the pipeline
checks the same plan at start and refuses to begin a run Ray could never schedule (Ray Train
would wait forever for GPUs the generator pool or the evaluator hold).

Roles and what each asks Ray for (as the code that starts them does):

    trainer     trainer.num_workers Ray Train workers: 1 GPU each when trainer.use_gpu, and
                trainer.cpus_per_worker CPUs
    generator   generation.num_engines engine actors: gpus_per_engine GPUs on one node (a
                placement group of {GPU: 1, CPU: 1} bundles when > 1), else cpus_per_engine
    evaluator   one actor: eval.gpus GPUs, eval.cpus CPUs, for the whole run
    reference   data.ref_actors Ray Data actors: 1 GPU each when trainer.use_gpu, else 1 CPU
    ray-data    one Ray Data read task (1 CPU) beside the trainer and the reference actors

Phases: not every role is alive at once.

    reference   reference + ray-data + evaluator + generator (ingested round-0 data only,
                before the trainer starts)
    run         trainer + ray-data + evaluator + generator

The trainer's workers live for the whole run (one Ray Train run for every round), and so do
the engines (which also hold pi_ref and score samples as they are drawn) and the evaluator:
they must all fit at once. pipeline.overlap (sampling round r+1 while round r trains) needs
nothing more; auto is on.

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

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the plan reads a Config; importing it at run time would be circular
    from dqo_ray.config import Config, ModelConfig

GIB = 2**30


class PlanError(ValueError):
    """A cluster description that cannot be read (the message names it)."""


# -- clusters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPUKind:
    name: str
    memory_gib: float
    bf16_tflops: float
    """Dense bf16 tensor-core peak (datasheet), for MFU."""


# Datasheet numbers (SXM parts where there are two). A100 without a memory suffix is the 40 GB
# part (AWS p4d, GCP a2-highgpu): the smaller one, so a plan never counts on memory it lacks.
GPU_KINDS: dict[str, GPUKind] = {k.name: k for k in (
    GPUKind("H100", 80, 989), GPUKind("H200", 141, 989), GPUKind("B200", 180, 2250),
    GPUKind("A100", 40, 312), GPUKind("L40S", 48, 362), GPUKind("L4", 24, 121),
    GPUKind("A10G", 24, 70),
)}

DEFAULT_CPUS_PER_GPU = 12
"""CPUs a described GPU node is assumed to have per GPU when the description does not say
(p4d: 96 for 8 GPUs; p5 and a3 have more)."""


def gpu_kind(name: str, memory_gib: float | None = None) -> GPUKind:
    """"H100", "H100-80GB", "A100-80G" (Ray's accelerator type names), "l4" -> a GPUKind; an
    unknown name is kept with the memory given (0 = unknown: memory is then not estimated)."""
    match = re.fullmatch(r"([A-Za-z0-9]+?)(?:[-_](\d+(?:\.\d+)?)G(?:B|IB)?)?", name.strip(),
                         re.IGNORECASE)
    if not match:
        raise PlanError(f"GPU type {name!r} is not a name such as H100 or A100-80GB")
    base, size = match.group(1).upper(), match.group(2)
    known = GPU_KINDS.get(base)
    memory = memory_gib or (float(size) if size else (known.memory_gib if known else 0.0))
    return GPUKind(base, memory, known.bf16_tflops if known else 0.0)


@dataclass(frozen=True)
class Node:
    name: str
    cpus: float
    gpus: int
    gpu: GPUKind | None = None


@dataclass(frozen=True)
class Cluster:
    label: str
    nodes: tuple[Node, ...]

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    def describe(self) -> str:
        kinds = sorted({f"{n.gpu.name} {_num(n.gpu.memory_gib)} GiB" for n in self.nodes
                        if n.gpu and n.gpus})
        return (f"{self.label}: {len(self.nodes)} node(s), {self.gpus} GPUs"
                f"{' (' + ', '.join(kinds) + ')' if kinds else ''}, {_num(self.cpus)} CPUs")


CLUSTER_SPEC = re.compile(r"(\d+)x(\d+)x([A-Za-z0-9.\-_]+?)(?::(\d+)cpus?)?", re.IGNORECASE)


def parse_cluster(spec: str) -> Cluster:
    """NODESxGPUSxTYPE[-MEMGB][:CPUScpu], e.g. 2x8xH100, 2x8xH100-80GB, 1x8xA100-40GB:96cpu:
    identical nodes; CPUs default to DEFAULT_CPUS_PER_GPU per GPU."""
    match = CLUSTER_SPEC.fullmatch(spec.strip())
    if not match:
        raise PlanError(f"{spec!r} is not a cluster NODESxGPUSxTYPE[-MEMGB][:CPUScpu] such as "
                        "2x8xH100-80GB")
    nodes, gpus, kind, cpus = match.groups()
    if int(nodes) < 1 or int(gpus) < 1:
        raise PlanError(f"{spec!r}: needs at least one node and one GPU per node")
    gpu = gpu_kind(kind)
    if not gpu.memory_gib:
        raise PlanError(f"{spec!r}: GPU type {gpu.name} has no known memory size; say it, "
                        f"e.g. {gpu.name}-80GB")
    node_cpus = float(cpus) if cpus else float(DEFAULT_CPUS_PER_GPU * int(gpus))
    return Cluster(spec.strip(), tuple(Node(f"node{i}", node_cpus, int(gpus), gpu)
                                       for i in range(int(nodes))))


RUNNING = "the running Ray cluster"


def cluster_from_ray_nodes(nodes: Iterable[Mapping[str, Any]],
                           gpu_memory_gib: float | None = None) -> Cluster:
    """The alive nodes of `ray.nodes()` as a Cluster. A node's GPU type is Ray's
    `accelerator_type:<name>` resource; its memory comes from GPU_KINDS (or `gpu_memory_gib`)."""
    out = []
    for node in nodes:
        if not node.get("Alive", node.get("alive", True)):
            continue
        resources = node.get("Resources", {})
        gpus = int(resources.get("GPU", 0))
        kinds = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
        gpu = gpu_kind(kinds[0], gpu_memory_gib) if kinds else (
            GPUKind("GPU", gpu_memory_gib or 0.0, 0.0) if gpus else None)
        name = f"{node.get('NodeManagerAddress', '?')} ({str(node.get('NodeID', '?'))[:12]})"
        out.append(Node(name, float(resources.get("CPU", 0)), gpus, gpu))
    return Cluster(RUNNING, tuple(out))


# -- model sizes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int
    head_dim: int | None = None
    qkv_bias: bool = False
    source: str = ""

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def params(self) -> int:
        """Parameters of the causal LM (gated MLP, GQA attention, RMSNorm)."""
        return self.backbone_params + (0 if self.tied else self.vocab * self.hidden)

    @property
    def backbone_params(self) -> int:
        """Without an untied LM head: the value model's backbone."""
        q, kv = self.heads * self.head_size, self.kv_heads * self.head_size
        attention = self.hidden * (q + 2 * kv) + q * self.hidden
        if self.qkv_bias:
            attention += q + 2 * kv
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.vocab * self.hidden + self.layers * layer + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * dtype_bytes


def _shape(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, max_positions,
           qkv_bias=False) -> ModelShape:
    return ModelShape(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied,
                      max_positions, None, qkv_bias, "the table of known models")


# Hub models by name (their config.json values), for planning on a machine without the folder.
# Instruct and base checkpoints share a shape; the key is the name without "-Instruct".
KNOWN_MODELS: dict[str, ModelShape] = {s.name.lower(): s for s in (
    _shape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True, 32768, qkv_bias=True),
    _shape("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True, 32768, qkv_bias=True),
    _shape("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True, 32768, qkv_bias=True),
    _shape("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, 32768, qkv_bias=True),
    _shape("Qwen2.5-Math-1.5B", 1536, 28, 12, 2, 8960, 151936, True, 4096, qkv_bias=True),
    _shape("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True, 131072),
    _shape("Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True, 131072),
    _shape("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True, 8192),
    _shape("SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, True, 8192),
    _shape("SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 49152, True, 8192),
)}


def shape_from_hf_config(config: Mapping[str, Any], name: str, source: str) -> ModelShape:
    """A causal LM's HF config.json (a multimodal one's text_config) -> ModelShape."""
    c = dict(config.get("text_config") or config)
    hidden = int(c["hidden_size"])
    heads = int(c["num_attention_heads"])
    return ModelShape(
        name=name, hidden=hidden, layers=int(c["num_hidden_layers"]), heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads),
        intermediate=int(c.get("intermediate_size") or 4 * hidden),
        vocab=int(c["vocab_size"]),
        # Untied when the file does not say: an LM head counted twice errs on the safe side.
        tied=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        max_positions=int(c.get("max_position_embeddings") or 4096),
        head_dim=int(c["head_dim"]) if c.get("head_dim") else None,
        qkv_bias=bool(c.get("attention_bias") or c.get("model_type") in ("qwen2",)),
        source=source)


def model_shape(model: ModelConfig) -> ModelShape | None:
    """model.policy's shape: the tiny model's settings, the folder's config.json when this
    machine has it, else the table of known models by the folder's or hub name's last part.
    None when none of them knows it."""
    if model.policy == "tiny":
        # Its word-level vocabulary is built from the task's words at run time: ~1k.
        return ModelShape("tiny", model.tiny_hidden_size, model.tiny_layers, model.tiny_heads,
                          model.tiny_heads, 4 * model.tiny_hidden_size, 1024, True, 512,
                          source="model.tiny_* settings")
    config = Path(model.policy) / "config.json"
    if config.is_file():
        return shape_from_hf_config(json.loads(config.read_text()), Path(model.policy).name,
                                    str(config))
    key = re.sub(r"-instruct$", "", model.policy.rstrip("/").rsplit("/", 1)[-1].lower())
    return KNOWN_MODELS.get(key)


# -- what each role asks for -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """`count` units of one role, each needing `gpus` GPUs (on one node) and `cpus` CPUs."""

    role: str
    count: int
    gpus: int
    cpus: float
    what: str = ""

    def unit(self) -> str:
        parts = [f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}"] if self.gpus else []
        parts.append(f"{_num(self.cpus)} CPU{'s' if self.cpus != 1 else ''}")
        return ", ".join(parts)

    def __str__(self) -> str:
        return f"{self.role} {self.count} x ({self.unit()})"


def role_asks(cfg: Config) -> dict[str, Ask]:
    """What each role asks Ray for, exactly as the code that starts it asks."""
    t, g, e, d = cfg.trainer, cfg.generation, cfg.eval, cfg.data
    asks = {"trainer": Ask("trainer", t.num_workers, 1 if t.use_gpu else 0, t.cpus_per_worker,
                           f"Ray Train workers ({_train_engine(cfg)})")}
    if uses_generator(cfg):
        if g.gpus_per_engine > 1:  # a placement group of {GPU: 1, CPU: 1} bundles
            gen = Ask("generator", g.num_engines, g.gpus_per_engine, float(g.gpus_per_engine),
                      f"vLLM engines, tensor parallel {g.gpus_per_engine}")
        else:
            gen = Ask("generator", g.num_engines, g.gpus_per_engine, g.cpus_per_engine,
                      "vLLM engines" if g.gpus_per_engine else "engines on CPUs")
        asks["generator"] = gen
    asks["evaluator"] = Ask("evaluator", 1, e.gpus, e.cpus, "the evaluator actor (whole run)")
    asks["reference"] = Ask("reference", d.ref_actors, 1 if t.use_gpu else 0,
                            0.0 if t.use_gpu else 1.0, "reference-scoring actors (Ray Data; ingested data only)")
    asks["ray-data"] = Ask("ray-data", 1, 0, 1.0, "a Ray Data read task")
    return asks


def uses_generator(cfg: Config) -> bool:
    """False only when round 0 is ingested and there is no later round to sample."""
    return not (cfg.pipeline.round0 == "ingest" and cfg.pipeline.rounds == 1)


def _train_engine(cfg: Config) -> str:
    if cfg.trainer.engine == "torch":
        return "torch DDP"
    return f"DeepSpeed ZeRO {cfg.trainer.zero_stage}"


def phases(cfg: Config) -> dict[str, list[Ask]]:
    asks = role_asks(cfg)
    pool = [asks["generator"]] if "generator" in asks else []
    out = {}
    if cfg.pipeline.round0 == "ingest":
        out["reference"] = [asks["reference"], asks["ray-data"], asks["evaluator"], *pool]
    out["run"] = [asks["trainer"], asks["ray-data"], asks["evaluator"], *pool]
    return out


# -- placement ------------------------------------------------------------------------------------


def place(cluster: Cluster, asks: Sequence[Ask]) -> str | None:
    """First-fit decreasing of every unit onto the nodes (GPUs and CPUs of a unit on one node);
    None when all fit, else the unit that does not (named by role). CPU-only units go to nodes
    without GPUs first, as Ray's scheduler prefers."""
    # By position: several Ray nodes may share a machine (and so an address).
    free = [[n.gpus, n.cpus] for n in cluster.nodes]
    units = [(a, i) for a in asks for i in range(a.count)]
    units.sort(key=lambda u: (-u[0].gpus, -u[0].cpus))  # stable: role order breaks ties
    for ask, i in units:
        order = range(len(cluster.nodes))
        if not ask.gpus:
            order = sorted(order, key=lambda k: cluster.nodes[k].gpus > 0)
        for k in order:
            gpus, cpus = free[k]
            if gpus >= ask.gpus and cpus >= ask.cpus - 1e-9:
                free[k] = [gpus - ask.gpus, cpus - ask.cpus]
                break
        else:
            return f"{ask.role} {i + 1} of {ask.count} ({ask.unit()})"
    return None


# -- memory ------------------------------------------------------------------------------------


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
    return Memory("trainer", parts, gpu.memory_gib, gpu,
                  f"[{_train_engine(cfg)} over {n} worker(s), micro-batch {t.micro_batch_size} x "
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
                    f"{_num(gpu.memory_gib)} GiB; KV cache {kv_tokens:,} tokens"
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
                  f"{cfg.generation.gpu_memory_utilization} of {_num(gpu.memory_gib)} GiB]")


# -- the plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    cluster: Cluster
    shape: ModelShape | None
    asks: dict[str, Ask]
    overlap: bool
    overlap_why: str
    phases: dict[str, list[Ask]]
    memory: list[Memory] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def refusal(self) -> str:
        """One line per problem."""
        return "\n".join(f"plan refused: {p}" for p in self.problems)

    def render(self, title: str = "") -> str:
        lines = [f"# plan{': ' + title if title else ''}", "",
                 f"cluster: {self.cluster.describe()}"]
        if self.shape is not None:
            lines.append(f"model: {self.shape.name}, {self.shape.params / 1e9:.2f}B parameters "
                         f"(from {self.shape.source})")
        else:
            lines.append("model: size unknown (no config.json there, not in the table of known "
                         "models): GPU memory not estimated")
        lines.append(f"overlap: {'on' if self.overlap else 'off'} ({self.overlap_why})")
        lines += ["", "| role | count | GPUs each | CPUs each | node group | what |",
                  "| --- | ---: | ---: | ---: | --- | --- |"]
        for ask in self.asks.values():
            lines.append(f"| {ask.role} | {ask.count} | {ask.gpus} | {_num(ask.cpus)} | "
                         f"{self._group(ask)} | {ask.what} |")
        lines += ["", "| phase | at once | GPUs | CPUs |", "| --- | --- | ---: | ---: |"]
        for name, asks in self.phases.items():
            gpus = sum(a.count * a.gpus for a in asks)
            cpus = sum(a.count * a.cpus for a in asks)
            lines.append(f"| {name} | {', '.join(a.role for a in asks)} | {gpus} of "
                         f"{self.cluster.gpus} | {_num(cpus)} of {_num(self.cluster.cpus)} |")
        if self.memory:
            lines += ["", "memory per GPU (GiB, rough):"]
            lines += [f"- {m.describe()}" for m in self.memory]
        if self.notes:
            lines += ["", "notes:"] + [f"- {n}" for n in self.notes]
        lines += ["", "fits: yes" if self.ok else f"fits: no ({len(self.problems)} problem(s))"]
        return "\n".join(lines)

    def _group(self, ask: Ask) -> str:
        if ask.gpus:
            kinds = sorted({n.gpu.name for n in self.cluster.nodes
                            if n.gpus >= ask.gpus and n.gpu is not None})
            return (f"GPU nodes ({', '.join(kinds) or 'none here'}, {ask.gpus} GPU(s) on one "
                    "node)")
        return "any node with CPUs (CPU-only nodes first)"


def _fit_problems(cfg: Config, cluster: Cluster, shape: ModelShape | None
                  ) -> tuple[list[str], list[Memory], list[str]]:
    """(problems, memory estimates, notes) of the plan."""
    problems, notes = [], []
    for name, asks in phases(cfg).items():
        failed = place(cluster, asks)
        if failed:
            gpus = sum(a.count * a.gpus for a in asks)
            cpus = sum(a.count * a.cpus for a in asks)
            largest = max((n.gpus for n in cluster.nodes), default=0)
            problems.append(
                f"phase {name} needs {' + '.join(str(a) for a in asks)} = {gpus} GPUs, "
                f"{_num(cpus)} CPUs at once; {cluster.label} has {cluster.gpus} GPUs "
                f"(at most {largest} on a node), {_num(cluster.cpus)} CPUs: no node has room "
                f"for {failed}")
    memory = _memory(cfg, cluster, shape, problems, notes)
    return problems, memory, notes


def _gpu_of(cluster: Cluster, gpus: int) -> GPUKind | None:
    """The smallest-memory GPU kind among nodes with `gpus` GPUs (the one a role may land on)."""
    kinds = [n.gpu for n in cluster.nodes if n.gpus >= gpus and n.gpu and n.gpu.memory_gib]
    return min(kinds, key=lambda k: k.memory_gib) if kinds else None


def _memory(cfg: Config, cluster: Cluster, shape: ModelShape | None, problems: list[str],
            notes: list[str]) -> list[Memory]:
    asks = role_asks(cfg)
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
                            f"more than the {_num(round(m.budget, 1))} GiB "
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
                f" x {_num(gpu.memory_gib)} GiB) and {what}, less than one sequence of "
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


def make_plan(cfg: Config, cluster: Cluster, shape: ModelShape | None) -> Plan:
    """The plan of `cfg` on `cluster`; pipeline.overlap auto is decided here."""
    mode = cfg.pipeline.overlap
    overlap = mode != "off"
    why = {"on": "pipeline.overlap: on", "off": "pipeline.overlap: off",
           "auto": "auto: the trainer, the engines and the evaluator are all held for the "
                   "run"}[mode]
    problems, memory, notes = _fit_problems(cfg, cluster, shape)
    if problems and cluster.label == RUNNING:
        notes.append("an autoscaling cluster starts its nodes on demand: plan for the cluster it "
                     "grows to with --cluster / ray.cluster (e.g. 2x8xH100-80GB)")
    if cfg.generation.gpus_per_engine > 1:
        notes.append("generation.gpus_per_engine > 1: the engine actor holds no GPU of its own "
                     "(its tensor-parallel workers do), so pi_ref scores its samples on CPUs: "
                     "slow for large models (a known limit)")
    if cfg.eval.gpus > 1:
        notes.append(f"eval.gpus: {cfg.eval.gpus} are held but the evaluator's engine uses one "
                     "(it runs without tensor parallelism)")
    if cfg.pipeline.warm_start.enabled:
        notes.append("the warm start trains in the driver process, on its CPUs, before anything "
                     "else starts")
    return Plan(cluster, shape, role_asks(cfg), overlap, why, phases(cfg), memory, problems,
                notes)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"



