"""Engine saturation: how much of the generator pool's wall time its engines spend sampling, with
one chunk handed to each engine at a time and with two (generation.chunks_in_flight).

    python benchmarks/engine_saturation.py [--prompts 480] [--repeats 3] [--record]

The demo's recipe (tinymath, its tiny model untrained: long random samples), two vLLM engines
on CPU in a local Ray instance, chunks of 8 prompts x 4 samples. The same pool samples the same
prompts into fresh rounds of one store (after an untimed warm-up), alternating 1, 2, 1, 2, ...
chunks in flight; per run:
the wall time and the engines' sampling share (the sum of their generate calls' seconds over
engines x wall time; the rest is each chunk's grading and pi_ref scoring and waiting for work).
`--record` appends the table to benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

if __name__ == "__main__":  # vLLM may spawn processes: everything runs under the guard
    import argparse
    import dataclasses
    import statistics
    import sys
    import tempfile
    import time
    from pathlib import Path

    REPO = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))

    from train_throughput import machine

    from actors.generator import GeneratorPool
    from dqo_ray.config import load_config
    from dqo_ray.data.store import TrajectoryStore
    from dqo_ray.models import load_tokenizer, save_tiny_checkpoint
    from dqo_ray.runtime import init_ray
    from dqo_ray.tasks.items import load_items
    from jobs.pipeline import task_vocabulary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dqo-saturation-"))
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"task.limit={args.prompts}", "generation.num_engines=2", "generation.chunk_prompts=8",
        "generation.samples_per_prompt=4", f"data.store={work / 'store'}"])
    policy = save_tiny_checkpoint(work / "tiny", task_vocabulary(cfg),
                                  hidden_size=cfg.model.tiny_hidden_size,
                                  layers=cfg.model.tiny_layers, heads=cfg.model.tiny_heads, seed=0)
    init_ray(cfg.ray, work / "engines.log")
    items = load_items(cfg.task, load_tokenizer(policy), cfg.run.seed)
    store = TrajectoryStore(cfg.store)
    pool = GeneratorPool(cfg, str(policy), str(policy))
    pool.generate(items[:16], round=1000, policy_version=0, store=store)  # warm-up: not timed
    rows = []
    for _ in range(args.repeats):
        for depth in (1, 2):
            pool.cfg = dataclasses.replace(cfg, generation=dataclasses.replace(
                cfg.generation, chunks_in_flight=depth))
            began = time.perf_counter()
            summary = pool.generate(items, round=len(rows), policy_version=0, store=store)
            rows.append({"depth": depth, "seconds": time.perf_counter() - began,
                         "share": summary.sampling_share, "tokens_s": summary.tokens_per_s})
            print(f"chunks in flight {depth}: {rows[-1]['seconds']:.1f} s, engines sampling "
                  f"{100 * summary.sampling_share:.0f}%, {summary.tokens_per_s:.0f} tokens/s",
                  flush=True)
    pool.shutdown()
    lines = ["| chunks in flight | runs | wall s | engines sampling | tokens/s |",
             "| ---: | ---: | --- | --- | --- |"]
    for depth in (1, 2):
        mine = [r for r in rows if r["depth"] == depth]
        lines.append(f"| {depth} | {len(mine)} | "
                     + " | ".join(" / ".join(fmt.format(r[key]) for r in mine)
                                  + f" (median {fmt.format(statistics.median(r[key] for r in mine))})"
                                  for key, fmt in (("seconds", "{:.1f}"), ("share", "{:.0%}"),
                                                   ("tokens_s", "{:.0f}"))) + " |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n## Engine saturation ({time.strftime('%Y-%m-%d')}, {machine()})\n\n"
                    f"`python benchmarks/engine_saturation.py --prompts {args.prompts}`: the "
                    "generator pool (2 vLLM engines on CPU, the demo's untrained tiny model, "
                    "chunks of 8 prompts x 4 samples), runs alternating.\n\n" + table + "\n")
