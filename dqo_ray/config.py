"""Typed, validated configuration: YAML file -> dataclasses, plus `--set key.path=value` overrides.

Every knob of the system lives here, once, with its default and its allowed values. Loading
fails at once, listing every problem with its key path, the bad value and what is allowed, e.g.
`trainer.zero_stage: 5 is not one of 0, 1, 2, 3`. Nothing else in the code base reads raw
dicts with `.get(key, default)`.

Validation is driven by the type hints:
- `Literal[...]` fields accept exactly the listed values;
- `int`, `float`, `str`, `bool`, `X | None`, `list[X]`, `dict[str, X]` and nested dataclasses
  are checked structurally (an int is accepted where a float is expected; a string that parses
  as a float is too, because PyYAML reads `1e-5` as a string);
- numeric bounds come from field metadata (`_range(ge=..., gt=..., le=..., lt=...)`);
- cross-field rules live in each section's `check()` method.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """Raised for any invalid configuration; the message lists every problem found."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        head = f"invalid configuration ({source})" if source else "invalid configuration"
        super().__init__(head + ":\n  " + "\n  ".join(problems))


def _range(*, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> dict[str, Any]:
    return {"range": (ge, gt, le, lt)}


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    name: str = "dqo"
    output_dir: str = "runs"
    """Root folder, a local path; the run folder is output_dir/name. On a multi-node cluster
    a path every node mounts (EFS, Filestore, a PVC, a bucket through a FUSE mount): the
    engines and the evaluator load checkpoints Ray Train wrote on another node, and the
    pipeline checks at start that every node sees it. An `s3://` / `gs://` URI is refused:
    the run folder is read and written as files by every stage."""
    seed: int = 0
    tensorboard: bool = True
    """Training metrics as TensorBoard event files in run_dir/tensorboard (rank 0)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `wandb` installed and logged in via WANDB_API_KEY)."""
    mlflow: bool = False
    """Also log to MLflow (needs `mlflow` installed; MLFLOW_TRACKING_URI from the environment)."""

    @property
    def run_dir(self) -> str:
        return self.output_dir.rstrip("/") + "/" + self.name

    def check(self) -> list[str]:
        if "://" in self.output_dir:
            return [f"run.output_dir: {self.output_dir!r} is a URI; the run folder (state file, "
                    "checkpoints, results) is read and written as files on every node, so it "
                    "must be a path every node mounts (EFS, Filestore, a PVC, or the bucket "
                    "through a FUSE mount such as mountpoint-s3 or gcsfuse): see "
                    "cluster/README.md"]
        return []


@dataclass
class RayConfig:
    address: str | None = None
    """None starts a local Ray instance; "auto" or "ray://host:port" joins a cluster."""
    num_cpus: int | None = field(default=None, metadata=_range(ge=1))
    """Logical CPUs for a local instance. None = max(4, physical cores): Ray Data read tasks need
    a whole free CPU beside the training workers, or the pipeline stalls on 2-core machines."""
    cluster: str | None = None
    """The cluster the run is planned for, NODESxGPUSxTYPE[-MEMGB][:CPUScpu] (e.g.
    2x8xH100-80GB, 1x8xA100-40GB:96cpu) or an autoscaling cluster's file (cluster/aws.yaml,
    cluster/kuberay/raycluster.yaml: the largest cluster it lets the autoscaler make): the
    pipeline checks its plan (dqo_ray.plan) against it at start instead of the nodes Ray has
    now, which an autoscaling cluster has not started yet. None = the running cluster's nodes."""
    role_resources: bool = False
    """Each trainer worker, engine and the evaluator also asks for one unit of its role's custom
    resource (dqo_trainer, dqo_generator, dqo_evaluator: dqo_ray.clusters.ROLE_RESOURCES), which
    the node types of the shipped cluster files declare: on an autoscaling cluster each role
    then gets, and makes the autoscaler start, the node type meant for it. Off = any node with
    the CPUs and GPUs."""
    request_resources: bool = True
    """At start, ask the autoscaler for the whole plan at once (ray.autoscaler.sdk.
    request_resources with every role's bundles), so that node types start in parallel rather
    than one at a time as actors wait; the request is withdrawn when the run ends. Harmless on a
    cluster without an autoscaler."""
    resource_check_s: float = field(default=30.0, metadata=_range(gt=0))
    """How often the pipeline checks that the alive nodes still hold the run's plan (a node
    lost to a spot preemption makes Ray wait silently; this logs it)."""
    resource_wait_s: float = field(default=0.0, metadata=_range(ge=0))
    """How long the pipeline waits for lost capacity to come back before it fails with the
    reason (0 = as long as it takes: an autoscaler replaces nodes). Re-submitting resumes."""

    def role_resource(self, role: str) -> dict[str, float]:
        """What one worker / engine / actor of `role` asks beyond CPUs and GPUs."""
        from dqo_ray.clusters import ROLE_RESOURCES

        return {ROLE_RESOURCES[role]: 1.0} if self.role_resources else {}

    def check(self) -> list[str]:
        if self.cluster is None:
            return []
        from dqo_ray.clusters import PlanError, parse_cluster

        try:
            parse_cluster(self.cluster)
        except PlanError as exc:
            return [f"ray.cluster: {exc}"]
        return []


@dataclass
class ModelConfig:
    policy: str = "tiny"
    """A local HF checkpoint folder, a hub name (not in tests), or "tiny" for the built-in tiny
    Llama with the word-level tokenizer."""
    tokenizer: str | None = None
    """Defaults to the policy's own tokenizer."""
    reference: str | None = None
    """pi_ref checkpoint; None = the policy checkpoint (the usual start: pi_theta = pi_ref).
    Later rounds train from newer checkpoints while pi_ref stays the base model."""
    value: str | None = None
    """Value model checkpoint; None initialises the value backbone from the policy checkpoint
    with a zero scalar head [choice: separate network, docs/algorithm.md section 2]."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = bfloat16 on GPU, float32 on CPU, decided by each process from what it has
    (dqo_ray.device): train workers (bf16 keeps fp32 master weights), engines, evaluator."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (training only): activation
    memory of one layer instead of all, for about a third more compute."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel of the models trained and scored with transformers (vLLM picks its
    own). auto = flash_attention_2 on a CUDA device where the flash_attn package imports, else
    sdpa (torch's fused attention, transformers' default); flash_attention_2 asked for by
    name where it cannot load is an error."""
    tiny_hidden_size: int = field(default=128, metadata=_range(ge=8))
    tiny_layers: int = field(default=4, metadata=_range(ge=1))
    tiny_heads: int = field(default=4, metadata=_range(ge=1))

    def check(self) -> list[str]:
        if self.tiny_hidden_size % self.tiny_heads:
            return [f"model.tiny_hidden_size: {self.tiny_hidden_size} is not divisible by "
                    f"model.tiny_heads ({self.tiny_heads})"]
        return []


@dataclass
class AlgoConfig:
    """Loss and return settings; docs/algorithm.md (section 9 lists every choice and default)."""

    name: Literal["dqo", "rft", "dpo", "dro"] = "dqo"
    beta: float = field(default=0.1, metadata=_range(gt=0))
    """KL coefficient of the regularised objective."""
    lam: float = field(default=1.0, metadata=_range(ge=0, le=1))
    """Lambda of the lambda-return; 1 = Monte-Carlo soft return (paper's ablation winner)."""
    value_coef: float = field(default=1.0, metadata=_range(ge=0))
    """c_V in L_pi + c_V * L_V."""
    off_policy: Literal["none", "truncated", "sequence"] = "truncated"
    """Importance correction for data from a behaviour policy mu (docs/algorithm.md section 3.3)."""
    trace_clip: float = field(default=1.0, metadata=_range(gt=0))
    """c_max for `truncated`: trace coefficient c = min(c_max, pi_theta / mu)."""
    sequence_weight_clip: float = field(default=1.0, metadata=_range(gt=0))
    """w_max for `sequence`: w = min(w_max, prod_h pi_theta / mu)."""
    reduction: Literal["token", "sequence"] = "token"
    """token = mean over all valid tokens of the batch; sequence = mean of per-sequence means."""
    truncated_response: Literal["zero", "bootstrap"] = "zero"
    """A response cut at the length limit: `zero` sets its reward and V_H to 0; `bootstrap` keeps
    its reward and uses V_phi(s_H) as V_H."""
    reward_correct: float = 1.0
    reward_incorrect: float = 0.0
    dpo_beta: float = field(default=0.1, metadata=_range(gt=0))
    kl_coef: float = field(default=0.1, metadata=_range(ge=0))
    """dqo: alpha * KL(pi_theta(.|s_h) || pi_ref(.|s_h)) over the whole vocabulary, per
    response token, added to the policy loss (OREO, arXiv 2412.16145: "to stabilise
    training", 0.01 there). The KL inside DQO's objective constrains only sampled tokens;
    this term also holds the mass a step would move to tokens nobody sampled. On by default
    because it won: without it DQO ended 10-20 points lower greedy (14-26 mean-sample) after
    3 rounds on each of 3 seeds (benchmarks/RESULTS.md, learning.py ablation kl0). 0 turns it
    off. Costs a reference forward in every step (pi_ref is loaded beside the policy)."""
    step_values: Literal["model", "mc"] = "model"
    """dqo: where V comes from. `model` = the value network V_phi at every token. `mc` = the
    paper's process supervision used as values (arXiv 2410.09302): Monte-Carlo rollouts
    (generation.process_reward_samples) measure the success rate p where each reasoning
    step starts, its soft value beta * log((1-p) e^(r_incorrect/beta) + p e^(r_correct/beta))
    is V there, and the policy fits DQO's consistency over whole steps
    (`dqo_ray.algo.dqo.dqo_step_loss`): each step is credited with the change of value it
    caused, not the whole outcome. No value network is trained; lam and off_policy do not
    apply. docs/algorithm.md section 5."""

    @property
    def has_value_model(self) -> bool:
        """dro and dqo (with step_values: model) train a value model; rft and dpo have none."""
        return self.name == "dro" or (self.name == "dqo" and self.step_values == "model")


@dataclass
class TrainerConfig:
    num_workers: int = field(default=2, metadata=_range(ge=1))
    cpus_per_worker: float = field(default=0.5, metadata=_range(gt=0))
    use_gpu: bool = False
    placement: Literal["pack", "strict_pack"] = "pack"
    """Ray Train's placement of the workers: `pack` fills nodes in turn and may split the group
    over nodes; `strict_pack` keeps every worker on one node (ZeRO's per-step all-gathers and
    reduce-scatters stay on the node's NVLink, not the network). With strict_pack the pipeline
    starts the engines only once the workers are placed, so that no engine takes a GPU the
    group's node needs, and the plan refuses a group larger than a node."""
    engine: Literal["auto", "deepspeed", "torch"] = "auto"
    """auto = DeepSpeed; a DeepSpeed that does not import is an error on a GPU worker (and for
    `deepspeed`), and only on a CPU worker falls back to plain torch DDP (a warning)."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    policy_lr: float = field(default=1e-6, metadata=_range(gt=0))
    value_lr: float = field(default=1e-5, metadata=_range(gt=0))
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = field(default=0, metadata=_range(ge=0))
    value_warmup_steps: int = field(default=0, metadata=_range(ge=0))
    """Global steps at the start of each training run that update only the value model (the
    policy is frozen, its lr schedule starts after them), so the policy's first steps see a
    fitted baseline rather than a zero head; as OpenRLHF's freezing_actor_steps for PPO.
    Ignored by rft and dpo, which have no value model."""
    weight_decay: float = field(default=0.0, metadata=_range(ge=0))
    micro_batch_size: int = field(default=8, metadata=_range(ge=1))
    grad_accum_steps: int = field(default=1, metadata=_range(ge=1))
    max_grad_norm: float = field(default=1.0, metadata=_range(gt=0))
    max_steps: int = field(default=100, metadata=_range(ge=1))
    log_every: int = field(default=10, metadata=_range(ge=1))
    checkpoint_every: int = field(default=50, metadata=_range(ge=1))
    num_to_keep: int = field(default=2, metadata=_range(ge=1))
    """Checkpoints kept per round (Ray Train deletes older ones). A pipeline keeps the newest
    2 x num_to_keep, whatever its rounds: the evaluator can still score the last round's
    checkpoints while the next round writes its own, and the disk does not grow with rounds."""
    max_failures: int = field(default=2, metadata=_range(ge=0))
    """A dead worker restarts the whole group from the last checkpoint, at most this often."""
    prefetch_batches: int = field(default=4, metadata=_range(ge=0))
    optimizer_across_rounds: Literal["reset", "carry"] = "reset"
    """The trainer lives for the whole pipeline and keeps its weights (fp32 master copies
    included) from round to round; each round's LR schedule starts again (warmup included).
    reset = Adam's moments start afresh each round (each round is its own optimisation on
    new data); carry = they carry over."""
    ledger: bool = False
    """Record the epoch positions each rank trained on per step (run_dir/ledger; audits)."""

    def check(self) -> list[str]:
        errors = []
        if self.warmup_steps >= self.max_steps:
            errors.append(f"trainer.warmup_steps: {self.warmup_steps} must be < "
                          f"trainer.max_steps ({self.max_steps})")
        if self.value_warmup_steps >= self.max_steps:
            errors.append(f"trainer.value_warmup_steps: {self.value_warmup_steps} must be < "
                          f"trainer.max_steps ({self.max_steps}), or the policy never trains")
        return errors


@dataclass
class DataConfig:
    store: str | None = None
    """Trajectory store root (local path or pyarrow filesystem URI). Unset: the run folder's
    `store` (run.output_dir/run.name/store), so two runs share data only when told to."""
    rounds: list[int] = field(default_factory=list)
    """Rounds to train on; empty = every round in the store."""
    round_weights: dict[str, float] = field(default_factory=dict)
    """Mixing weight per round (key = round number); missing rounds weigh 1."""
    prompt_groups: Literal["all", "balanced"] = "all"
    """Which rows of each prompt train dqo and dro (rft keeps its correct rows, dpo forms
    pairs): all, or
    balanced = for a prompt with c correct and i incorrect samples, min(c, i) of each, so
    prompts whose samples all agree drop out (`dqo_ray.data.groups.balanced_groups`; OREO
    keeps at most 4 + 4 per question, DAPO drops groups that all agree)."""
    max_prompt_tokens: int = field(default=512, metadata=_range(ge=1))
    """Longest prompt (tokens, template included) that is trained on. Ingest rejects a longer
    record (strict: stops at it); generation leaves a longer prompt out with a warning (an
    error when none is left). Prompts are never cut: a cut prompt is another problem."""
    max_response_tokens: int = field(default=512, metadata=_range(ge=1))
    """Longest response (tokens, EOS included). Ingest rejects a longer record (never cut: the
    reward grades the whole text); generation.max_new_tokens must not exceed it."""
    shuffle_seed: int = 0
    ref_actors: int = field(default=1, metadata=_range(ge=1))
    """Actors in the reference-scoring pool (one GPU each on GPU clusters)."""
    epoch_in_process_rows: int = field(default=50_000, metadata=_range(ge=0))
    """Rows of a round up to which the epoch planner builds each epoch with pyarrow in its own
    process (sub-second at the demo's size) rather than with Ray Data tasks and shuffles
    (seconds of fixed cost, but spread over the cluster for large data); same rows, same
    order either way. The planner holds such a round in memory (~16 bytes per token: 50k
    rows of 1k tokens ~ 0.8 GB) on the driver's node."""
    ref_batch_size: int = field(default=8, metadata=_range(ge=1))
    """Rows per pi_ref forward when scoring (in the engines, or the Ray Data stage)."""

    def check(self) -> list[str]:
        problems = []
        for key, weight in self.round_weights.items():
            if not key.lstrip("-").isdigit():
                problems.append(f"data.round_weights: key {key!r} is not a round number")
            if weight < 0:
                problems.append(f"data.round_weights.{key}: {weight} must be >= 0")
        return problems


TaskName = Literal["gsm8k", "math", "math500", "tinymath"]
"""The tasks of `dqo_ray.tasks.catalog.TASKS` (a test keeps the two lists equal)."""


@dataclass
class TaskConfig:
    name: TaskName = "gsm8k"
    source: str | None = None
    """Local .jsonl/.parquet file or folder (with train/test files), or a hub dataset name
    (never in tests). None = the task's default hub name."""
    split: str = "train"
    limit: int | None = field(default=None, metadata=_range(ge=1))
    """Use only the first `limit` problems (quick runs)."""
    k_shot: int = field(default=0, metadata=_range(ge=0))
    """Exemplars from the train split prepended to each prompt (8 for GSM8K, 4 for MATH with
    base models; 0 for instruction-tuned models)."""
    use_chat_template: bool = True
    """Use the tokenizer's chat template when it has one; else a plain template."""


@dataclass
class GradingConfig:
    """Answer grading in each process that grades (generator and evaluator actors). MATH
    answers that differ as strings are compared by math_verify (sympy) in a few child
    processes, each comparison time-limited (`dqo_ray.tasks.grader_pool`)."""

    workers: int = field(default=2, metadata=_range(ge=1))
    """Child processes per grading process: small, because the string comparison settles
    most answers and each child holds its own sympy."""
    timeout_s: float = field(default=5.0, metadata=_range(gt=0))
    """Limit per math_verify comparison (sympy can run for ever on a power tower); an answer
    still being compared at the limit grades False."""


@dataclass
class GenerationConfig:
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """auto = vLLM; a vLLM that does not import is an error on a CUDA machine (and for
    `vllm`), and only on a CPU falls back to HF generate (a warning)."""
    num_engines: int = field(default=1, metadata=_range(ge=1))
    gpus_per_engine: int = field(default=0, metadata=_range(ge=0))
    """>1 = tensor parallel over a placement group bundle per engine; 0 = CPU."""
    cpus_per_engine: float = field(default=1.0, metadata=_range(gt=0))
    samples_per_prompt: int = field(default=4, metadata=_range(ge=1))
    temperature: float = field(default=1.0, metadata=_range(ge=0))
    """0 = greedy. Behaviour log-probs are those of the tempered distribution."""
    top_p: float = field(default=1.0, metadata=_range(gt=0, le=1))
    max_new_tokens: int = field(default=256, metadata=_range(ge=1))
    chunk_prompts: int = field(default=16, metadata=_range(ge=1))
    """Prompts per work item handed to an engine actor (load balancing and retry unit)."""
    chunks_in_flight: int | None = field(default=None, metadata=_range(ge=1))
    """Chunks each engine works on at once: with 2, one is sampled while the one before is
    graded and scored with pi_ref (and the next waits in its queue), so the engine does not
    idle through those or the driver's round trip. None = auto: 2 when the engines have GPUs
    (sampling on the GPU, grading on CPUs), 1 on a CPU, where both compete for the same cores
    (benchmarks/RESULTS.md "Engine saturation": engines sampling 98% of the time instead of
    77%, but 4% slower end to end on 2 cores). The generation log reports the share."""
    seed: int = 0
    kv_cache_gb: float = field(default=1.0, metadata=_range(gt=0))
    """vLLM KV cache per engine on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = field(default=0.85, metadata=_range(gt=0, le=0.98))
    """vLLM on a GPU: the share of each of an engine's GPUs it takes (weights, activations, then
    the KV cache fills the rest). Also the evaluator's engine. The remainder of a generator
    engine's GPU holds pi_ref, which scores each sample as it is drawn (the plan checks that it
    fits: `reference`), hence below vLLM's own default of 0.9."""
    max_model_len: int | None = field(default=None, metadata=_range(ge=16))
    """vLLM: the longest sequence (prompt + response) an engine accepts; it must hold one such
    sequence in its KV cache. None = the model's own (max_position_embeddings, often 32k):
    set it to data.max_prompt_tokens + generation.max_new_tokens (or more) to say what the
    plan should count on."""
    max_num_seqs: int | None = field(default=None, metadata=_range(ge=1))
    """vLLM: sequences decoded together per step. None = vLLM's default. An engine is handed
    chunk_prompts x samples_per_prompt sequences at a time: keep that >= this to fill it."""
    process_reward_samples: int = field(default=0, metadata=_range(ge=0))
    """m completions per step prefix for Monte-Carlo process rewards; 0 = off."""
    process_reward_alpha: float = 1.0
    step_delimiter: str = "\n"
    vllm_in_process: bool | None = None
    """vLLM's engine core and model worker inside the engine actor's process (vLLM's
    VLLM_ENABLE_V1_MULTIPROCESSING=0) rather than two more processes. None = auto: in process
    on a CPU, where each extra process imports torch and vLLM again (an engine started in
    11-13 s instead of 33 s, generating as fast) and vLLM would pin every engine's worker to
    the same core; separate processes on a GPU, where vLLM overlaps scheduling with the
    model. With None, a VLLM_ENABLE_V1_MULTIPROCESSING in the environment wins."""
    weight_transfer: Literal["auto", "object_store", "broadcast"] = "auto"
    """How a refresh's weights reach the engines from the trainer, without disk: `object_store`
    = one safetensors blob through Ray's object store; `broadcast` = from the trainer's rank 0
    to every engine worker over a process group of their own (NCCL on GPUs, gloo on a CPU;
    `dqo_ray.models.weight_broadcast`). auto = broadcast when the trainer has GPUs (the NCCL
    path is written, not yet run on a GPU), else object_store."""
    placement: Literal["spread", "pack"] = "spread"
    """How engine actors are placed on a multi-node cluster: `spread` puts them on different
    nodes where it can (generation is the bulk of the work, and spreads memory); `pack` lets
    Ray fill one node first."""

    @property
    def chunks_at_once(self) -> int:
        """chunks_in_flight, auto resolved."""
        return self.chunks_in_flight or (2 if self.gpus_per_engine else 1)

    @property
    def vllm_memory(self) -> dict[str, Any]:
        """make_engine's vLLM memory settings, for the generator's engines and the
        evaluator's."""
        return {"gpu_memory_utilization": self.gpu_memory_utilization,
                "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs}


EvalDataset = TaskName


@dataclass
class EvalConfig:
    datasets: list[EvalDataset] = field(default_factory=lambda: ["gsm8k"])
    sources: dict[str, str] = field(default_factory=dict)
    """Dataset name -> local file or folder; a dataset without one loads from the hub."""
    split: str = "test"
    limit: int | None = field(default=None, metadata=_range(ge=1))
    """Score only the first `limit` problems of each dataset (quick runs)."""
    samples: int = field(default=1, metadata=_range(ge=1))
    """k sampled answers per problem besides the greedy one: maj@k, pass@k (1 = greedy only)."""
    temperature: float = field(default=1.0, metadata=_range(gt=0))
    max_new_tokens: int = field(default=512, metadata=_range(ge=1))
    k_shot: int = field(default=0, metadata=_range(ge=0))
    engine: Literal["auto", "vllm", "hf"] = "auto"
    cpus: float = field(default=1.0, metadata=_range(gt=0))
    cpu_nice: int = field(default=5, metadata=_range(ge=0, le=19))
    """How much lower the evaluator's CPU priority is than the other Ray workers' (an
    os.nice increment): its scores are on no round's critical path, so on a shared CPU it
    yields to sampling and training (on the demo the warm start's evaluation slowed round 0's
    sampling). 0 = the same priority."""
    gpus: int = field(default=0, metadata=_range(ge=0))
    max_restarts: int = field(default=3, metadata=_range(ge=0))
    """How many times the pipeline replaces a lost evaluator (its node gone, a crash) with a
    new one that redoes the unfinished evaluations, before it fails."""

    def check(self) -> list[str]:
        unknown = [k for k in self.sources if k not in get_args(EvalDataset)]
        return [f"eval.sources: {k!r} is not one of the eval datasets" for k in unknown]


@dataclass
class WarmStartConfig:
    """Supervised training on a limited set of gold worked solutions before round 0 (the
    policy and pi_ref both start from its result; dqo_ray.train.sft). Fixed steps, seed
    (run.seed) and threads make it reproducible; its result is cached by content (inputs +
    settings) under pipeline.cache_dir, so a second run skips it. AdamW without weight decay,
    the gradient norm clipped to 1."""

    enabled: bool = False
    split: str = "warm"
    """The task split whose worked solutions are the supervised set (disjoint from task.split,
    whose problems the RL rounds use with their final answers only)."""
    problems: int = field(default=500, metadata=_range(ge=1))
    steps: int = field(default=1000, metadata=_range(ge=1))
    """Optimizer steps (may exceed one pass over the problems)."""
    batch_size: int = field(default=32, metadata=_range(ge=1))
    lr: float = field(default=3e-3, metadata=_range(gt=0))
    """Peak learning rate: linear warm-up from lr / warmup_steps, then cosine decay to lr / 10
    at the last step."""
    warmup_steps: int = field(default=50, metadata=_range(ge=0))
    threads: int = field(default=2, metadata=_range(ge=1))
    """torch threads for the run, part of the result (float sums depend on how the work is
    split)."""
    flip_subtractions: float = field(default=0.0, metadata=_range(ge=0, le=1))
    """tinymath only: the share of subtraction steps the gold solutions write as additions
    (`tasks.tinymath_flaws.flip_subtractions`), a documented annotation flaw that outcome rewards
    can correct and more supervised training on the same set cannot."""
    drop_answer_line: float = field(default=0.0, metadata=_range(ge=0, le=1))
    """tinymath only: the share of gold solutions that stop after their last step without the
    "The answer is N." line the grader reads (`tasks.tinymath_flaws.drop_answer_line`), a documented
    annotation flaw that outcome rewards can correct and more supervised training cannot."""


@dataclass
class PipelineConfig:
    """The offline-to-online driver (jobs/pipeline.py, docs/algorithm.md section 6)."""

    rounds: int = field(default=2, metadata=_range(ge=1))
    """Training rounds. Round r trains on data rounds 0..r (mixed by data.round_weights),
    starting from round r-1's checkpoint; data round r+1 is sampled from the policy."""
    round0: Literal["generate", "ingest"] = "generate"
    """Round 0's data: sampled from the start policy by the generator pool, or ingested from
    `ingest_source` (a JSONL/Parquet file of trajectories, jobs/ingest.py format)."""
    ingest_source: str | None = None
    overlap: Literal["auto", "on", "off"] = "auto"
    """Sample round r+1 from round r-1's checkpoint while round r trains (one round stale,
    corrected by the recorded behaviour log-probs). auto = on: the trainer, the engines and the
    evaluator are all held for the whole run (dqo_ray.plan), so nothing is gained by waiting.
    Off: round r+1 is sampled from round r's policy after round r has trained."""
    evaluate_start: bool = True
    """Also evaluate the start checkpoint (the table's baseline row)."""
    cache_dir: str | None = None
    """Content-addressed results reused across runs (the warm start); None = run.output_dir
    /cache, which must be as durable (and, on a multi-node cluster, as shared) as the runs.
    A local path, as run.output_dir."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def check(self) -> list[str]:
        problems = []
        if self.round0 == "ingest" and not self.ingest_source:
            problems.append("pipeline.ingest_source: required when pipeline.round0 is 'ingest'")
        if self.cache_dir is not None and "://" in self.cache_dir:
            problems.append(f"pipeline.cache_dir: {self.cache_dir!r} is a URI; the cache is "
                            "read and written as files: give a path every node mounts")
        return problems


@dataclass
class CompareConfig:
    """jobs/compare.py: pipeline runs that differ only in algo.name, on the same prompts,
    samples and training budget, plus a supervised control."""

    algos: list[Literal["dqo", "rft", "dpo", "dro"]] = field(
        default_factory=lambda: ["dqo", "rft", "dpo", "dro"])
    gold_control: bool = True
    """Also continue supervised training on the warm-start gold set for the same budget
    (steps x batch), from the warm-start checkpoint: is any gain more than more SFT?"""


# Head sizes vLLM 0.32's CPU attention accepts; a tiny model outside them fails inside vLLM.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    grading: GradingConfig = field(default_factory=GradingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    @property
    def store(self) -> str:
        """The trajectory store root: data.store, else the run folder's `store`."""
        return self.data.store or f"{self.run.run_dir}/store"

    def check(self) -> list[str]:
        problems = []
        if self.generation.max_new_tokens > self.data.max_response_tokens:
            problems.append(f"generation.max_new_tokens: {self.generation.max_new_tokens} "
                            f"exceeds data.max_response_tokens ({self.data.max_response_tokens})"
                            "; sampled responses must fit what training accepts")
        head_dim = self.model.tiny_hidden_size // self.model.tiny_heads
        if (self.model.policy == "tiny" and self.generation.engine != "hf"
                and head_dim not in VLLM_CPU_HEAD_SIZES):
            problems.append(
                f"model.tiny_hidden_size / model.tiny_heads = {head_dim} is not a head size "
                f"vLLM supports on CPU ({', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); "
                "change them or set generation.engine: hf")
        gen = self.generation
        if gen.max_model_len is not None:
            # Process-reward completions continue a response prefix (up to max_new_tokens - 1
            # tokens) by up to max_new_tokens more.
            longest = max(self.data.max_prompt_tokens + gen.max_new_tokens
                          * (2 if gen.process_reward_samples else 1),
                          self.data.max_prompt_tokens + self.eval.max_new_tokens)
            if gen.max_model_len < longest:
                problems.append(
                    f"generation.max_model_len: {gen.max_model_len} is shorter than the longest "
                    f"sequence an engine is given ({longest} = data.max_prompt_tokens + "
                    "generation.max_new_tokens, eval.max_new_tokens"
                    + (" and the process-reward continuations" if gen.process_reward_samples
                       else "") + ")")
        bf16 = self.model.dtype == "bfloat16" or (self.model.dtype == "auto"
                                                  and self.trainer.use_gpu)
        if bf16 and self.trainer.engine != "torch" and self.trainer.zero_stage == 0:
            problems.append("trainer.zero_stage: 0 with bf16 training (model.dtype "
                            f"{self.model.dtype!r}{' on GPUs' if self.trainer.use_gpu else ''})"
                            ": DeepSpeed without ZeRO updates the bf16 weights with no fp32 "
                            "master copy; use zero_stage >= 1 (stage 1 moves as many bytes as DDP)")
        if self.algo.name == "dpo" and self.trainer.micro_batch_size % 2:
            problems.append(f"trainer.micro_batch_size: {self.trainer.micro_batch_size} must be "
                            "even for algo.name 'dpo' (a batch holds whole (chosen, rejected) "
                            "pairs)")
        for flaw in ("flip_subtractions", "drop_answer_line"):
            if getattr(self.pipeline.warm_start, flaw) and self.task.name != "tinymath":
                problems.append(f"pipeline.warm_start.{flaw}: only for task.name 'tinymath' "
                                f"(got {self.task.name!r})")
        if (self.algo.name == "dqo" and self.algo.step_values == "mc"
                and not self.generation.process_reward_samples):
            problems.append("algo.step_values: 'mc' needs generation.process_reward_samples "
                            "> 0 (the rollouts that measure each step's success rate)")
        if (self.algo.name == "dqo" and self.algo.step_values == "mc"
                and self.generation.process_reward_alpha):
            problems.append("generation.process_reward_alpha: must be 0 with algo.step_values "
                            "'mc' (the rollouts already set the values; shaped rewards on top "
                            "would count the same evidence twice)")
        if self.algo.step_values == "mc" and self.algo.truncated_response == "bootstrap":
            problems.append("algo.truncated_response: 'bootstrap' needs a value model; with "
                            "algo.step_values 'mc' use 'zero'")
        return problems


# --------------------------------------------------------------------------------------------
# Structural validation driven by type hints
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Checks `value` against type `tp`; returns the converted value (problems appended)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on / off as a bool
        # bool is an int subclass: never let True stand in for 1.
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        problems.append(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            converted = _convert(value, option, path, trial)
            if not trial:
                return converted
        problems.append(f"{path}: {value!r} is not {_type_name(tp)}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: {value!r} is not a list")
            return value
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{path}: {value!r} is not a mapping")
            return value
        return {str(k): _convert(v, item_tp, f"{path}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this validator does not know is a bug here
        raise TypeError(f"unsupported config field type {tp!r} at {path}")
    problems.append(f"{path}: {value!r} is not {_type_name(tp)}")
    return value


def _check_range(value: Any, bounds: tuple, path: str, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, gt, le, lt = bounds
    for bound, ok, op in ((ge, lambda v, b: v >= b, ">="), (gt, lambda v, b: v > b, ">"),
                          (le, lambda v, b: v <= b, "<="), (lt, lambda v, b: v < b, "<")):
        if bound is not None and not ok(value, bound):
            problems.append(f"{path}: {value!r} must be {op} {bound}")


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    where = path or "<top level>"
    section_start = len(problems)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{full}: unknown key{hint}; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        full = f"{path}.{name}" if path else name
        before = len(problems)
        kwargs[name] = _convert(raw[name], hints[name], full, problems)
        if len(problems) == before and "range" in f.metadata:
            _check_range(kwargs[name], f.metadata["range"], full, problems)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - all fields have defaults
        problems.append(f"{where}: {exc}")
        return cls()
    # Cross-field rules only make sense once every field of the section is well-typed.
    if hasattr(obj, "check") and len(problems) == section_start:
        problems.extend(obj.check())
    return obj


def validate(section: Any, path: str) -> None:
    """Checks a section built or changed in code (dataclasses.replace skips the checks that
    loading runs) by the same rules; raises ConfigError naming `path`'s keys."""
    problems: list[str] = []
    _build(type(section), dataclasses.asdict(section), path, problems)
    if problems:
        raise ConfigError(problems)


def from_dict(raw: dict[str, Any], source: str | None = None) -> Config:
    """Builds and validates a Config from a plain mapping; raises ConfigError listing problems."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------

def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected key.path=value"])
    key, _, text = item.partition("=")
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError([f"--set {item!r}: empty key in {key!r}"])
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {item!r}: value is not valid YAML ({exc})"]) from exc
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies `a.b.c=value` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError([f"--set {item!r}: {where} is {child!r}, not a section"])
            node = child
        node[keys[-1]] = value
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (or the defaults when `path` is None), applies overrides, validates."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError([f"cannot read config file: {exc}"], source) from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from exc
        if not isinstance(raw, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {raw!r}"], source)
    apply_overrides(raw, overrides)
    if overrides:
        source += " with --set " + " ".join(overrides)
    return from_dict(raw, source)


def save_resolved(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Writes the fully resolved config to run_dir/config.resolved.yaml (atomic rename)."""
    from dqo_ray.io import atomic_write

    return atomic_write(Path(run_dir) / "config.resolved.yaml",
                        yaml.safe_dump(to_dict(cfg), sort_keys=False))


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override, e.g. --set trainer.policy_lr=1e-5")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
