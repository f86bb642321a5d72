"""Generation throughput: vLLM engine vs HF generate on the same ~60M-parameter model.

    python benchmarks/generation_throughput.py [--prompts 32] [--record]

Both engines get the same token-id prompts and SamplingSpec (n=4, temperature 1, log-probs of
the sampled tokens), fp32 on CPU, after one warm-up call each. Also times one in-place weight
refresh of the vLLM engine (reload from a second checkpoint + prefix-cache reset).
`--record` appends the table to benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

if __name__ == "__main__":  # vLLM may spawn processes: everything runs under the guard
    import argparse
    import itertools
    import os
    import string
    import sys
    import tempfile
    import time
    from pathlib import Path

    REPO = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(REPO / "benchmarks"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))

    import torch
    from train_throughput import machine

    from actors.engines import SamplingSpec, make_engine
    from dqo_ray.models import build_word_tokenizer, load_policy, tiny_llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--words", type=int, default=16000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    letters = string.ascii_lowercase
    words = ["".join(p) for p in itertools.islice(itertools.product(letters, repeat=3),
                                                  args.words)]
    tokenizer = build_word_tokenizer(words)
    for seed, name in ((0, "a"), (1, "b")):
        model = tiny_llama(len(tokenizer), hidden_size=args.hidden, layers=args.layers,
                           heads=args.hidden // 64, seed=seed, tokenizer=tokenizer)
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    params = sum(p.numel() for p in load_policy(work / "a").parameters())
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tokenizer), (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.prompts)]
    spec = SamplingSpec(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens,
                        seed=0)
    warm = SamplingSpec(n=1, temperature=1.0, max_new_tokens=4, seed=0)

    results = {}
    refresh_s = None
    for kind in ("hf", "vllm"):
        engine = make_engine(kind, str(work / "a"), kv_cache_gb=2.0, seed=0)
        engine.generate(prompts[:2], warm)
        start = time.perf_counter()
        out = engine.generate(prompts, spec)
        seconds = time.perf_counter() - start
        tokens = sum(len(s.token_ids) for group in out for s in group)
        results[kind] = (tokens, seconds)
        if kind == "vllm":
            start = time.perf_counter()
            engine.load_weights(str(work / "b"))
            refresh_s = time.perf_counter() - start
        del engine

    hf_rate = results["hf"][0] / results["hf"][1]
    setup = (f"model {params / 1e6:.1f}M params (Llama, hidden {args.hidden}, {args.layers} "
             f"layers, vocab {len(tokenizer)}), {args.prompts} prompts x {args.prompt_len} "
             f"tokens, n={args.n}, {args.new_tokens} new tokens, temperature 1, sampled-token "
             f"log-probs, fp32, {args.threads} threads")
    lines = ["| engine | tokens | seconds | tokens/s | x HF |", "|---|---|---|---|---|"]
    for kind, (tokens, seconds) in results.items():
        rate = tokens / seconds
        lines.append(f"| {kind} | {tokens} | {seconds:.1f} | {rate:,.0f} | {rate / hf_rate:.2f} |")
    table = "\n".join(lines)
    print(f"\n{setup}\n\n{table}\n\nvLLM weight refresh (reload + prefix-cache reset): "
          f"{refresh_s:.2f}s")
    if args.record:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n## generation_throughput.py, {time.strftime('%Y-%m-%d')}, {machine()}\n\n"
                    f"{setup}. Command: `python benchmarks/generation_throughput.py "
                    f"{' '.join(sys.argv[1:])}`\n\n{table}\n\nvLLM weight refresh: "
                    f"{refresh_s:.2f}s\n")
