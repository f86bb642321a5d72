"""Smallest end-to-end DQO path (no Ray yet): sample -> reward -> ref log-probs -> train -> resample.

    python -m jobs.demo [--config configs/demo.yaml] [--set trainer.max_steps=60]

The task is a toy outcome reward on the tiny model: a response earns 1 if it contains the
digit 7. The policy starts at random init, so "7" appears in only a few samples; DQO must
raise that rate while the KL term keeps it near pi_ref. The real demo (tinymath, the Ray
pipeline) replaces this once it lands; this job exists to show the core working end to end.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from dqo_ray.config import add_config_args, config_from_args, save_resolved
from dqo_ray.data.batch import pad_trajectories
from dqo_ray.models import load_policy, load_tokenizer, load_value, save_tiny_checkpoint
from dqo_ray.train.step import loss_on_batch

log = logging.getLogger("demo")
WORDS = ("Tom", "Ann", "has", "apples", "pears", "say", "a", "number")
PROMPTS = [f"{name} has {n} {fruit}. say a number" for name in ("Tom", "Ann")
           for n in range(8) for fruit in ("apples", "pears")]
TARGET = "7"


@torch.no_grad()
def sample(policy, tokenizer, prompts: list[str], n: int, max_new_tokens: int) -> list[dict]:
    """n samples per prompt with their behaviour log-probs (of the distribution sampled from)."""
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    rows = []
    for i, chat in enumerate(chats):
        prompt_ids = tokenizer(chat)["input_ids"]
        out = policy.generate(torch.tensor([prompt_ids] * n), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              return_dict_in_generate=True, output_scores=True,
                              pad_token_id=tokenizer.pad_token_id)
        new = out.sequences[:, len(prompt_ids):]  # [n, steps]
        # scores are the processed logits actually sampled from (temperature/top-k/top-p)
        logp = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, new[..., None])[..., 0]
        for j in range(n):
            ids = new[j].tolist()
            stop = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids \
                else len(ids)
            text = tokenizer.decode(ids[:stop], skip_special_tokens=True)
            rows.append({"traj_id": f"{i}-{j}", "prompt_ids": prompt_ids,
                         "response_ids": ids[:stop], "response": text,
                         "behaviour_logprobs": logp[j, :stop].tolist(),
                         "reward": float(TARGET in text),
                         "finish_reason": "stop" if stop < len(ids) or
                         ids[-1] == tokenizer.eos_token_id else "length"})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(2)
    run_dir = Path(cfg.run.run_dir)
    log.info("run folder %s (resolved config: %s)", run_dir, save_resolved(cfg, run_dir))

    base = save_tiny_checkpoint(run_dir / "base", WORDS, hidden_size=cfg.model.tiny_hidden_size,
                                layers=cfg.model.tiny_layers, heads=cfg.model.tiny_heads,
                                seed=cfg.run.seed)
    tokenizer, reference = load_tokenizer(base), load_policy(base).eval()
    policy, value = load_policy(base), load_value(None, base)
    max_new = min(cfg.data.max_response_tokens, 8)

    before = sample(reference, tokenizer, PROMPTS, args.samples, max_new)
    for row in before:  # round 0: mu = pi_ref, so ref log-probs are the behaviour log-probs
        row["ref_logprobs"] = row["behaviour_logprobs"]
    rate_before = sum(r["reward"] for r in before) / len(before)
    log.info("sampled %d responses from pi_ref; reward rate %.3f", len(before), rate_before)

    opt = torch.optim.Adam([{"params": policy.parameters(), "lr": cfg.trainer.policy_lr},
                            {"params": value.parameters(), "lr": cfg.trainer.value_lr}])
    gen = torch.Generator().manual_seed(cfg.run.seed)
    history, start = [], time.time()
    for step in range(1, cfg.trainer.max_steps + 1):
        idx = torch.randperm(len(before), generator=gen)[: cfg.trainer.micro_batch_size]
        batch = pad_trajectories([before[i] for i in idx], tokenizer.pad_token_id)
        out = loss_on_batch(policy, value, batch, cfg.algo)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([*policy.parameters(), *value.parameters()],
                                       cfg.trainer.max_grad_norm)
        opt.step()
        history.append({k: v.item() for k, v in out.metrics.items()})
        if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
            m = history[-1]
            log.info("step %d/%d loss %.4f residual %.3f kl %.4f (%.1f steps/s)", step,
                     cfg.trainer.max_steps, m["loss"], m["residual_abs"], m["kl_k1"],
                     step / (time.time() - start))

    after = sample(policy.eval(), tokenizer, PROMPTS, args.samples, max_new)
    rate_after = sum(r["reward"] for r in after) / len(after)
    first, last = history[0], history[-1]
    table = ("| | reward rate | DQO loss |\n|---|---|---|\n"
             f"| pi_ref (start) | {rate_before:.3f} | {first['loss']:.4f} |\n"
             f"| after {len(history)} DQO steps | {rate_after:.3f} | {last['loss']:.4f} |\n")
    report = run_dir / "report.md"
    report.write_text(f"# DQO demo (toy reward: response contains {TARGET!r})\n\n{table}\n"
                      f"{len(before)} samples, beta={cfg.algo.beta}, lam={cfg.algo.lam}, "
                      f"off_policy={cfg.algo.off_policy}\n")
    print(table)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
