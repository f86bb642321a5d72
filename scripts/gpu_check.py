"""The GPU path on one lent GPU, in a few minutes (issue 15, deliver 6): run by
scripts/gpu_check.sh, which gives it the results file to write.

    python scripts/gpu_check.py RESULTS.md [--size 0.5b] [--steps 10] [--engine auto]

Needs torch (with CUDA) and transformers only: no Ray, no vLLM, no internet; DeepSpeed where it
imports (else the plain torch engine, and the table says why). The models are built from
configs with random weights (nothing is downloaded). Checks, each a row of the table:

1. device rules: dqo_ray.device's choice for this process (cuda / nccl / bfloat16 /
   DS_ACCELERATOR=cuda) and model.dtype auto -> bfloat16;
2. all-reduce: a one-rank NCCL group; the training loop's metric reductions put their tensors
   where the backend needs them (collective_device) and return the right values;
3. train step: the DQO step of the training loop (`_train_step`: policy + value model, the
   frozen pi_ref forward of the default full-vocabulary KL term, gradient checkpointing, the
   attention kernel model.attn_implementation auto picks) through our engine classes (bf16,
   fp32 master weights), as the GPU recipe (--recipe, default configs/gsm8k-qwen2.5-1.5b.yaml)
   runs it: its model's shape (Qwen2.5-1.5B: vocabulary 151,936), ZeRO stage, micro-batch and
   sequence length (8 x 1024), or a smaller model (--size): tokens/s, step time, peak memory
   and the peak of the policy's logits (each beside the plan's estimate, dqo_ray.plan_memory)
   and MFU;
4. bf16 HF export: what the engines and the evaluator load (dqo_ray.train.loop.export_hf);
5. sampled-token log-probs: HF generate (actors.engines.hf, the engine used where vLLM is not)
   on CUDA, against the training code's forward pass (dqo_ray.models.forward.sequence_logprobs),
   at temperature 1 and 0.7, in bf16 and fp32.

Exit status: 0 when every check passed (or there is no CUDA: "no CUDA: nothing to check"),
1 when one failed (the table says which and why).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30
NOTHING = "no CUDA: nothing to check"

# Llama-shaped models built from a config. 0.5b: policy 0.55B + value model 0.55B.
SIZES: dict[str, dict[str, int]] = {
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
    "0.25b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, vocab_size=256),
}
RECIPE = "configs/gsm8k-qwen2.5-1.5b.yaml"
# The generation model (its own word-level tokenizer, so that every sampled id decodes).
GEN_SIZES: dict[str, dict[str, int]] = {
    "0.5b": dict(words=3000, hidden_size=1024, layers=8, heads=8, new_tokens=64),
    "0.25b": dict(words=3000, hidden_size=1024, layers=8, heads=8, new_tokens=64),
    "tiny": dict(words=50, hidden_size=64, layers=2, heads=2, new_tokens=8),
}
GEN_SIZES["recipe"] = GEN_SIZES["0.5b"]  # sampling checks the engine, not the recipe's size
# |sampled log-prob - forward log-prob| limits: fp32 differs by summation order only; bf16
# by its 8-bit mantissa (cached decoding vs one full forward).
LIMITS = {"float32": (1e-4, 2e-3), "bfloat16": (0.03, 0.5)}  # (mean, max)


class Results:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, float]] = []
        self.env: list[tuple[str, str]] = []

    def run(self, name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        began = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # the row says what failed; the next checks still run
            traceback.print_exc()
            ok, detail = False, f"{type(exc).__name__}: {exc}".replace("\n", " ")[:600]
        seconds = time.perf_counter() - began
        self.rows.append((name, "pass" if ok else "FAIL", detail, seconds))
        print(f"[gpu_check] {name}: {'pass' if ok else 'FAIL'} ({seconds:.1f}s) {detail}",
              flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return all(r[1] == "pass" for r in self.rows)

    def markdown(self, title: str) -> str:
        lines = [f"# {title}", "", f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
                 f"`scripts/gpu_check.sh` ({'all passed' if self.ok else 'FAILED'})", ""]
        lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in self.env]
        lines += ["", "| check | result | measured | seconds |", "| --- | --- | --- | ---: |"]
        lines += [f"| {n} | {r} | {d.replace('|', '/')} | {s:.1f} |" for n, r, d, s in self.rows]
        return "\n".join(lines) + "\n"


def environment(cuda: bool) -> list[tuple[str, str]]:
    import torch
    import transformers
    from transformers.utils import is_flash_attn_2_available

    env = [("host", platform.node()), ("python", platform.python_version()),
           ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
           ("transformers", transformers.__version__)]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.append(("GPU", f"{props.name}, {props.total_memory / GIB:.0f} GiB, "
                           f"{torch.cuda.device_count()} visible"))
    try:
        import deepspeed

        env.append(("deepspeed", deepspeed.__version__))
    except Exception as exc:
        env.append(("deepspeed", f"does not import ({type(exc).__name__})"))
    env.append(("flash_attn", "available" if is_flash_attn_2_available() else "not available"))
    return env


def peak_tflops(cuda: bool) -> float:
    """bf16 dense peak of this GPU from dqo_ray.clusters' table (0 when unknown)."""
    if not cuda:
        return 0.0
    import torch

    from dqo_ray.clusters import GPU_KINDS

    name = torch.cuda.get_device_name(0).upper()
    for kind in sorted(GPU_KINDS.values(), key=lambda k: -len(k.name)):  # L40S before L4
        if kind.name in name.replace(" ", ""):
            return kind.bf16_tflops
    return 0.0


# -- 1. device rules -------------------------------------------------------------------------------


def check_device(cuda: bool, device) -> tuple[bool, str]:
    import torch

    from dqo_ray.device import choose_device
    from dqo_ray.models import resolve_dtype

    choice = choose_device(cuda)
    want = ("cuda", "nccl", "bfloat16", "cuda") if cuda else ("cpu", "gloo", "float32", "cpu")
    got = (choice.device, choice.backend, choice.dtype, choice.ds_accelerator)
    auto = resolve_dtype("auto", device)
    ok = got == want and auto == getattr(torch, want[2])
    return ok, (f"device {got[0]}, backend {got[1]}, dtype auto -> {str(auto)[6:]}, "
                f"DS_ACCELERATOR={got[3]}")


# -- 2. all-reduce ---------------------------------------------------------------------------------


def init_group(cuda: bool, device) -> str:
    import torch.distributed as dist

    from dqo_ray.device import choose_device

    if dist.is_initialized():
        return dist.get_backend()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads these too
    backend = choose_device(cuda).backend
    dist.init_process_group(backend, rank=0, world_size=1,
                            **({"device_id": device} if cuda else {}))
    return backend


def check_all_reduce(cuda: bool, device) -> tuple[bool, str]:
    import torch
    import torch.distributed as dist

    from dqo_ray.train.loop import _mean_across_ranks, _reduce_device, _sum_across_ranks

    backend = init_group(cuda, device)
    where = _reduce_device(device)
    # One rank: each reduction returns this rank's value; world_size=2 makes the helpers run
    # their collective (world_size 1 returns early) and divide the mean by 2.
    mean = _mean_across_ranks({"a": 4.0, "b": 2.0}, 2, device)
    total = _sum_across_ranks(3.0, 2, device)
    ok = where.type == device.type and mean == {"a": 2.0, "b": 1.0} and total == 3.0
    detail = (f"{backend} group of 1; metric tensors on {where}; mean {mean}, sum {total}")
    if cuda:  # the fault fixed in issue 15: NCCL given a CPU tensor
        try:
            dist.all_reduce(torch.ones(1))
            detail += "; a CPU tensor on NCCL was accepted"
        except Exception as exc:
            detail += f"; a CPU tensor on NCCL is refused ({type(exc).__name__})"
    return ok, detail


# -- 3. train step and 4. export -------------------------------------------------------------------


def synthetic_batch(micro_batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    from dqo_ray.data.batch import pad_trajectories

    rng = random.Random(seed)
    prompt = seq // 4
    rows = []
    for i in range(micro_batch):
        response = seq - prompt
        rows.append({
            "prompt_ids": [rng.randrange(3, vocab) for _ in range(prompt)],
            "response_ids": [rng.randrange(3, vocab) for _ in range(response)],
            "behaviour_logprobs": [-rng.uniform(0.1, 5.0) for _ in range(response)],
            "ref_logprobs": [-rng.uniform(0.1, 5.0) for _ in range(response)],
            "reward": float(i % 2), "finish_reason": "stop"})
    return pad_trajectories(rows, pad_id=0)


def train_check(args, cuda: bool, device, state: dict[str, Any]) -> tuple[bool, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dqo_ray.config import load_config
    from dqo_ray.device import EngineUnavailable
    from dqo_ray.model_shapes import model_shape, shape_from_hf_config
    from dqo_ray.models import ValueModel, ValueModelConfig, attn_implementation
    from dqo_ray.plan_memory import trainer_memory
    from dqo_ray.train.loop import _train_step
    from dqo_ray.train.train_engine import build_engine, import_deepspeed

    init_group(cuda, device)
    kind, why = "torch", "asked for"
    if args.engine != "torch":
        try:
            import_deepspeed(cuda)
            kind, why = "deepspeed", "imports"
        except EngineUnavailable as exc:
            if args.engine == "deepspeed":
                raise
            why = f"DeepSpeed does not import: {exc}"
    bf16 = cuda
    recipe = load_config(args.recipe)
    seq = args.seq or recipe.data.max_prompt_tokens + recipe.data.max_response_tokens
    micro = args.micro_batch or recipe.trainer.micro_batch_size
    stage = recipe.trainer.zero_stage
    cfg = load_config(None, [
        "algo.name=dqo", f"trainer.engine={kind}", f"trainer.zero_stage={stage}",
        f"algo.kl_coef={recipe.algo.kl_coef}",
        f"trainer.micro_batch_size={micro}", "trainer.grad_accum_steps=1",
        f"trainer.max_steps={args.steps + 10}", "trainer.num_workers=1",
        "model.gradient_checkpointing=true", f"data.max_prompt_tokens={seq // 4}",
        f"data.max_response_tokens={seq - seq // 4}", "generation.max_new_tokens=8",
        "eval.max_new_tokens=8"])
    if args.size == "recipe":  # the recipe's own architecture (Qwen2: GQA, qkv bias)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        shape = model_shape(recipe.model)
        name = shape.name
        config = Qwen2Config(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                             num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                             num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                             tie_word_embeddings=shape.tied, max_position_embeddings=max(4096, seq))
        causal_lm = Qwen2ForCausalLM
    else:
        name = f"{args.size} Llama-shaped"
        config = LlamaConfig(**SIZES[args.size], tie_word_embeddings=True,
                             max_position_embeddings=max(4096, seq))
        causal_lm = LlamaForCausalLM
    attn = attn_implementation("auto", device)
    torch.manual_seed(0)
    with torch.device(device):
        policy = causal_lm(config)
        value = ValueModel(ValueModelConfig(backbone_config=config))
        # pi_ref for algo.kl_coef > 0 (the recipes' 0.1): frozen, in the training dtype, as the
        # loop loads it.
        reference = (causal_lm(config).to(torch.bfloat16 if bf16 else torch.float32)
                     if cfg.algo.kl_coef > 0 else None)
    if reference is not None:
        reference.set_attn_implementation(attn)
        reference.eval().requires_grad_(False)
    for model in (policy, value):
        model.set_attn_implementation(attn)
        model.gradient_checkpointing_enable()
        model.train()
    params = sum(p.numel() for m in (policy, value) for p in m.parameters())
    # lr 1e-3: an update must show in bf16 weights (resolution ~1e-4 at their size) for the
    # "weights moved" check; the model is random, nothing is learnt.
    engines = {"policy": build_engine(kind, policy, 1e-3, cfg.trainer, bf16),
               "value": build_engine(kind, value, 1e-3, cfg.trainer, bf16)}
    batch = synthetic_batch(micro, seq, config.vocab_size)
    before = next(engines["policy"].module.parameters()).detach().float().clone()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):  # warm-up: kernel selection, allocator
        _train_step(engines, [batch], cfg.algo, device, True, reference)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    losses = []
    for _ in range(args.steps):
        metrics, _ = _train_step(engines, [batch], cfg.algo, device, True, reference)
        losses.append(metrics["loss"])
    sync()
    seconds = time.perf_counter() - began
    tokens_s = micro * seq * args.steps / seconds
    logits_peak = _logits_peak(policy, batch, device, cuda) if cuda else None
    moved = not torch.equal(before, next(engines["policy"].module.parameters()).detach().float())
    dtype = next(engines["policy"].module.parameters()).dtype
    shape = shape_from_hf_config(config.to_dict(), f"{args.size} check model", "its config")
    estimate = trainer_memory(cfg, shape, _gpu(cuda))
    detail = (f"{kind} ({why}), ZeRO {stage}, {'bf16' if bf16 else 'fp32'} (module "
              f"{str(dtype)[6:]}), attention {attn}, {name}: "
              f"policy + value {params / 1e9:.2f}B parameters"
              f"{' (+ frozen pi_ref)' if reference is not None else ''}, vocabulary "
              f"{config.vocab_size:,}, micro-batch "
              f"{micro} x {seq} tokens, gradient checkpointing, {args.steps} steps: "
              f"{tokens_s:,.0f} tokens/s, {seconds / args.steps * 1000:.0f} ms/step")
    if cuda:
        peak = torch.cuda.max_memory_allocated() / GIB
        tflops = peak_tflops(cuda)
        mfu = 6 * params * tokens_s / (tflops * 1e12) if tflops else float("nan")
        detail += (f"; peak memory {peak:.1f} GiB (the plan's estimate {estimate.total:.1f} GiB)"
                   f"; logits peak {logits_peak:.1f} GiB (the plan's "
                   f"{estimate.parts.get('logits', 0):.1f} GiB)"
                   f"; MFU {100 * mfu:.1f}% (6 x parameters x tokens/s over "
                   f"{tflops or '?'} TFLOPS bf16, recomputation not counted)")
    state.update(engines=engines, bf16=bf16)
    ok = all(math.isfinite(x) for x in losses) and moved and (dtype == torch.bfloat16
                                                              if bf16 and kind == "deepspeed"
                                                              else True)
    return ok, detail + ("" if moved else "; the weights did not move")


def _logits_peak(policy, batch: dict[str, Any], device, cuda: bool) -> float:
    """GiB the policy's forward + backward adds to what is resident, with the loss on its
    full-vocabulary logits: the logits' share of a step (one micro-batch)."""
    import torch

    from dqo_ray.models.forward import sequence_logprobs

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ids = batch["input_ids"].to(device)
    logprobs = sequence_logprobs(policy, ids, batch["attention_mask"].to(device))
    logprobs.sum().backward()
    policy.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def _gpu(cuda: bool):
    import torch

    from dqo_ray.clusters import GPUKind

    if not cuda:
        return GPUKind("cpu", 0.0, 0.0)
    return GPUKind(torch.cuda.get_device_name(0),
                   torch.cuda.get_device_properties(0).total_memory / GIB, 0.0)


def export_check(work: Path, state: dict[str, Any]) -> tuple[bool, str]:
    import torch
    from safetensors import safe_open

    from dqo_ray.train.loop import export_hf

    if "engines" not in state:
        return False, "no trained engine (the train step failed)"
    want = torch.bfloat16 if state["bf16"] else None
    folder = work / "export"
    began = time.perf_counter()
    export_hf(state["engines"]["policy"], folder, 0, None, want)
    seconds = time.perf_counter() - began
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    config = json.loads((folder / "config.json").read_text())
    size = sum(f.stat().st_size for f in folder.iterdir()) / GIB
    expected = {"BF16"} if want is not None else {"F32"}
    ok = dtypes == expected and (want is None or config.get("dtype") == "bfloat16")
    return ok, (f"safetensors {sorted(dtypes)}, config.json dtype {config.get('dtype')}, "
                f"{size:.2f} GiB written in {seconds:.1f}s")


# -- 5. sampled-token log-probs ------------------------------------------------------------------


def _words(n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for i in range(n):
        word, k = "", i + 27
        while k:
            word, k = letters[k % 26] + word, k // 26
        out.append(word)
    return out


def generation_model(size: str, work: Path) -> Path:
    from dqo_ray.models import build_word_tokenizer, tiny_llama

    spec = GEN_SIZES[size]
    folder = work / "generation-model"
    tokenizer = build_word_tokenizer(_words(spec["words"]))
    model = tiny_llama(len(tokenizer), spec["hidden_size"], spec["layers"], spec["heads"],
                       max_positions=1024, seed=0, tokenizer=tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logprob_check(size: str, folder: Path, device, dtype: str) -> tuple[bool, str]:
    import torch

    from actors.engines.base import SamplingSpec
    from actors.engines.hf import HFEngine
    from dqo_ray.data.batch import pad_trajectories
    from dqo_ray.models.forward import sequence_logprobs

    engine = HFEngine(str(folder), dtype=dtype, device=str(device), seed=0)
    rng = random.Random(1)
    first = 6  # after the special and whitespace tokens
    vocab = len(engine.tokenizer)
    prompts = [[rng.randrange(first, vocab) for _ in range(rng.randrange(16, 40))]
               for _ in range(8)]
    new_tokens = GEN_SIZES[size]["new_tokens"]
    mean_limit, max_limit = LIMITS[dtype]
    parts, ok = [], True
    for temperature in (1.0, 0.7):
        spec = SamplingSpec(n=4, temperature=temperature, max_new_tokens=new_tokens, seed=3)
        samples = engine.generate(prompts, spec)
        rows = [{"prompt_ids": p, "response_ids": s.token_ids, "reward": 0.0,
                 "finish_reason": s.finish_reason}
                for p, group in zip(prompts, samples, strict=True) for s in group]
        batch = pad_trajectories(rows, engine.pad_id)
        with torch.no_grad():
            forward = sequence_logprobs(engine.model, batch["input_ids"].to(device),
                                        batch["attention_mask"].to(device),
                                        temperature=temperature).float().cpu()
        mask = batch["response_mask"][:, 1:]
        got = forward[mask]
        sampled = torch.tensor([x for group in samples for s in group for x in s.logprobs])
        diff = (got - sampled).abs()
        worst, mean = float(diff.max()), float(diff.mean())
        ok &= mean <= mean_limit and worst <= max_limit and len(sampled) == len(got)
        parts.append(f"T={temperature}: {len(sampled)} tokens, mean abs diff {mean:.2e}, max "
                     f"{worst:.2e}")
    parts.append(f"limits mean {mean_limit:g}, max {max_limit:g}")
    return ok, f"{engine.model.dtype} on {device}: " + "; ".join(parts)


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="markdown file to write the results table to")
    parser.add_argument("--recipe", default=RECIPE, help="the GPU recipe whose ZeRO stage, "
                        "micro-batch, sequence length, KL term and (with --size recipe) model "
                        "shape the train step uses")
    parser.add_argument("--size", choices=["recipe", *sorted(SIZES)], default="recipe")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--seq", type=int, default=None,
                        help="tokens per training sequence; default: the recipe's prompt + "
                        "response tokens")
    parser.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto",
                        help="auto: DeepSpeed where it imports, else plain torch")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print(NOTHING)
        out.write_text(f"# GPU check\n\n{NOTHING} (scripts/gpu_check.sh on "
                       f"{platform.node()}).\n")
        return 0
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    results = Results()
    results.env = environment(cuda)
    state: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dqo-gpu-check-") as tmp:
        work = Path(tmp)
        results.run("device rules", lambda: check_device(cuda, device))
        results.run("all-reduce on the backend's device", lambda: check_all_reduce(cuda, device))
        results.run("train step (DQO: policy + value + pi_ref)",
                    lambda: train_check(args, cuda, device, state))
        results.run("bf16 HF export" if cuda else "HF export", lambda: export_check(work, state))
        state.clear()  # the engines' memory, before generation
        if cuda:
            torch.cuda.empty_cache()
        folder = generation_model(args.size, work)
        for dtype in ("bfloat16", "float32"):
            results.run(f"sampled-token log-probs = forward ({dtype})",
                        lambda dtype=dtype: logprob_check(args.size, folder, device, dtype))
    title = "GPU check" + (" (CPU dry run: not a GPU result)" if not cuda else "")
    out.write_text(results.markdown(title))
    print(f"[gpu_check] results: {out} ({'all passed' if results.ok else 'FAILED'})")
    return 0 if results.ok else 1


if __name__ == "__main__":
    sys.exit(main())
