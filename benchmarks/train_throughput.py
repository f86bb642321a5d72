"""Training throughput: full Ray Data + Ray Train + DeepSpeed path vs the same step bare.

    python benchmarks/train_throughput.py [--steps 200] [--rows 4000] [--record]

Same model, same micro-batch and accumulation, same rows, DeepSpeed ZeRO-1 fp32 on CPU, one
torch thread per process:
  bare      run_training() in this process over pre-collated batches held in memory
  ray x1    jobs.train's path: EpochPlanner (Ray Data) -> TorchTrainer, 1 worker
  ray x2    the same with 2 workers
Steady-state tokens/s is the median over report windows after the first (which holds start-up).
`--record` appends the table to benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import torch  # noqa: E402

from dqo_ray.config import load_config  # noqa: E402
from dqo_ray.data.batch import pad_trajectories  # noqa: E402
from dqo_ray.data.store import TrajectoryStore  # noqa: E402
from dqo_ray.data.streams import score_reference  # noqa: E402
from dqo_ray.models import load_policy, load_tokenizer, save_tiny_checkpoint  # noqa: E402
from dqo_ray.runtime import init_ray  # noqa: E402
from dqo_ray.train.loop import WorkerIO, run_training  # noqa: E402
from dqo_ray.train.ray_trainer import train_on_store  # noqa: E402
from dqo_ray.train.train_engine import init_single_process_group  # noqa: E402

WORDS = ("Tom", "Ann", "has", "apples", "pears", "gives", "away", "How", "many", "left")


def build_store(root: Path, checkpoint: Path, rows: int, seed: int = 0) -> TrajectoryStore:
    tok = load_tokenizer(checkpoint)
    store = TrajectoryStore(str(root))
    gen = torch.Generator().manual_seed(seed)
    per_shard = 1000
    for shard_start in range(0, rows, per_shard):
        shard = []
        for i in range(shard_start, min(rows, shard_start + per_shard)):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": f"Tom has {i % 97} apples. How many left?"}],
                add_generation_prompt=True, tokenize=False)
            length = int(torch.randint(32, 65, (1,), generator=gen))
            response = torch.randint(10, len(tok), (length,), generator=gen).tolist()
            response.append(tok.eos_token_id)
            shard.append(dict(
                traj_id=f"t{i}", prompt_id=f"p{i % 97}", round=0, policy_version=0,
                dataset="bench", prompt=prompt, response="", prompt_ids=tok(prompt)["input_ids"],
                response_ids=response, behaviour_logprobs=None, reward=float(i % 3 == 0),
                correct=i % 3 == 0, finish_reason="stop", step_ends=None, step_rewards=None,
                ref_logprobs=None))
        store.write_shard(shard, round=0)
    return store


def steady(metrics: list[dict], key: str) -> float:
    values = [m[key] for m in metrics[1:]] or [metrics[0][key]]
    return statistics.median(values)


def run_bare(cfg, checkpoint: Path, store: TrajectoryStore) -> list[dict]:
    rows = store.read_table().to_pylist()
    micro, accum = cfg.trainer.micro_batch_size, cfg.trainer.grad_accum_steps
    pad = load_tokenizer(checkpoint).pad_token_id
    batches = [pad_trajectories(rows[i:i + micro], pad, pad_to_multiple=8)
               for i in range(0, len(rows) - micro + 1, micro)]
    for i, b in enumerate(batches):
        b["positions"] = torch.arange(i * micro, (i + 1) * micro)
        b["order_key"] = b["positions"]

    def stream(epoch: int, skip: int):
        for s in range(skip, len(batches) // accum):
            yield batches[s * accum:(s + 1) * accum]

    reports: list[dict] = []
    init_single_process_group()
    torch.set_num_threads(1)
    run_training(cfg, str(checkpoint), WorkerIO(0, 1, stream, lambda m, f: reports.append(m),
                                                scratch=Path(tempfile.mkdtemp())))
    return reports


def run_ray(cfg, checkpoint: Path, workers: int, run_root: Path) -> list[dict]:
    from dqo_ray.config import from_dict, to_dict

    raw = to_dict(cfg)
    raw["trainer"]["num_workers"] = workers
    raw["run"].update(name=f"ray{workers}", output_dir=str(run_root))
    cfg = from_dict(raw)
    train_on_store(cfg, str(checkpoint))
    lines = (run_root / f"ray{workers}" / "train_metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores ({model}), no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    checkpoint = save_tiny_checkpoint(work / "base", WORDS, hidden_size=args.hidden,
                                      layers=args.layers, heads=4)
    cfg = load_config(None, [
        f"data.store={work / 'store'}", f"trainer.max_steps={args.steps}",
        f"trainer.micro_batch_size={args.micro}", f"trainer.grad_accum_steps={args.accum}",
        "trainer.log_every=20", f"trainer.checkpoint_every={args.steps}", "trainer.zero_stage=1",
        "trainer.policy_lr=1e-4", "trainer.value_lr=1e-4", f"run.output_dir={work / 'runs'}"])
    store = build_store(work / "store", checkpoint, args.rows)
    init_ray(cfg.ray)
    score_reference(store, str(checkpoint), load_tokenizer(checkpoint).pad_token_id, actors=1,
                    batch_size=64)

    results = {}
    t = time.time()
    results["bare (1 process, in-memory batches)"] = run_bare(cfg, checkpoint, store)
    print(f"bare done in {time.time() - t:.0f}s", flush=True)
    for workers in (1, 2):
        t = time.time()
        results[f"Ray Data + Ray Train + DeepSpeed, {workers} worker(s)"] = run_ray(
            cfg, checkpoint, workers, work / "runs")
        print(f"ray x{workers} done in {time.time() - t:.0f}s", flush=True)

    bare_tps = steady(results["bare (1 process, in-memory batches)"], "tokens_per_s")
    header = "| path | tokens/s (steady) | x bare | data wait (steady) |\n|---|---|---|---|\n"
    rows = []
    for name, metrics in results.items():
        tps = steady(metrics, "tokens_per_s")
        wait = steady(metrics, "data_wait_frac")
        rows.append(f"| {name} | {tps:,.0f} | {tps / bare_tps:.2f} | {100 * wait:.1f}% |")
    n_params = sum(p.numel() for p in load_policy(checkpoint).parameters())
    setup = (f"model {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers), "
             f"{args.rows} rows, responses 33-65 tokens, micro-batch {args.micro} x accum "
             f"{args.accum}, {args.steps} steps, DeepSpeed ZeRO-1 fp32, 1 thread per process")
    table = header + "\n".join(rows)
    print(f"\n{setup}\n\n{table}")
    if args.record:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n## train_throughput.py, {time.strftime('%Y-%m-%d')}, {machine()}\n\n"
                    f"{setup}. Command: `python benchmarks/train_throughput.py "
                    f"{' '.join(sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
