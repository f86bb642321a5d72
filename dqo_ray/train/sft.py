"""Supervised fine-tuning (SFT) for the warm start: one process, plain torch, no Ray.

The demo's policy starts from supervised training on a small set of gold solutions, run to a
plateau with fixed steps, seed and thread count so the result is reproducible bit for bit,
and cached so a second run skips it. A control baseline continues the same training from that
checkpoint for more steps. Both call `supervised_finetune`, with the settings of
`pipeline.warm_start` (`WarmStartConfig`) and the run's seed.

One step: draw `batch_size` examples, build `prompt + target` rows right-padded with the
tokenizer's pad id, run the model, and take the mean cross-entropy of the target tokens only
(`sft_loss`, the RFT loss); AdamW, gradient clipping, linear warm-up then cosine decay to 10%
(`lr_at`, the trainer's schedule).

Output folder (HF format, loadable with `load_policy` / `load_tokenizer`):
    config.json, model.safetensors, generation_config.json   the fine-tuned policy
    tokenizer files                                          copied from the input
    sft.json                                                 cache key, settings, losses, time
It is written atomically: everything goes into a hidden temporary sibling folder, sft.json
last, and the folder is renamed to `out_dir` only when complete. A folder named `out_dir`
therefore either holds a finished run or is not ours; a crash leaves at most a hidden
`.<name>.sft-tmp-*` sibling, which is never read (delete it at will).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from dqo_ray.algo.baselines import rft_loss
from dqo_ray.config import WarmStartConfig, validate
from dqo_ray.models.loading import load_policy, load_tokenizer
from dqo_ray.train.schedule import lr_at

log = logging.getLogger(__name__)

# Bumped when the training procedure changes in a way that changes the result for the same
# inputs, so that older cached folders are reported as stale rather than reused.
SFT_FORMAT = 1
META_FILE = "sft.json"
# Files of the input checkpoint that determine the result: model config and weights, plus the
# tokenizer (it gives the pad id and is copied into the output). Other files (logs, an earlier
# sft.json with its timings, optimizer states) are left out of the cache key.
_KEY_FILES = (
    "config.json", "generation_config.json",
    "model*.safetensors", "model*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model*.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt",
    "merges.txt",
)
_WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin")
# Fixed choices (no caller ever changed them): cosine decay to 10% of lr at the last step,
# global gradient norm clipped to 1, no weight decay.
MIN_LR_RATIO = 0.1
MAX_GRAD_NORM = 1.0
# Steps between progress logs (does not change the result).
LOG_EVERY = 50


@dataclass(frozen=True)
class SFTExample:
    """One training pair as token ids, already templated (the caller applies any chat
    template). `prompt_ids` are context only; `target_ids` are learned and should end with
    EOS so the model learns to stop."""

    prompt_ids: list[int]
    target_ids: list[int]


@dataclass
class SFTResult:
    """checkpoint: the HF folder written (or reused); losses: per-step mean target-token loss;
    cached: True when an identical earlier run was reused (nothing trained); seconds: wall
    time of this call (the original training time of a cached run is in its sft.json)."""

    checkpoint: str
    losses: list[float]
    cached: bool
    seconds: float


# ---------------------------------------------------------------------------------------------
# Pure pieces: loss, learning-rate schedule, batches, example order


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor,
             loss_mask: torch.Tensor) -> torch.Tensor:
    """The RFT loss (`rft_loss`) with every row correct: mean next-token cross-entropy over
    the positions `loss_mask` marks.

    Args:
        logits: [B, L, V] model outputs; logits[:, t] scores the token at t + 1.
        input_ids: [B, L] int64 token ids.
        loss_mask: [B, L] bool/0-1, true where the token is a target token (never on prompt
            or padding). The mask is on the predicted token: position t + 1 is scored by
            logits[:, t], so the first token of a row is never scored.

    Returns:
        Scalar float32: sum of -log p(target token) / number of target tokens in the batch
        (a token-level mean, so long targets weigh more than short ones).
    """
    mask = loss_mask[:, 1:].bool()  # [B, L-1]
    if not mask.any():
        raise ValueError("sft_loss: loss_mask selects no predictable token")
    pred = logits[:, :-1].float()  # [B, L-1, V] scores for tokens 1..L-1
    targets = input_ids[:, 1:]  # [B, L-1]
    # cross_entropy, not token_logprobs: they round differently in the last bits, and the
    # cached warm starts were trained with this one.
    logprobs = -F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1),
                                reduction="none").reshape(targets.shape)  # [B, L-1]
    return rft_loss(logprobs, mask, correct=mask.new_ones(mask.shape[0])).loss


def example_order(n: int, seed: int) -> Iterator[int]:
    """Endless example indices: one random permutation of range(n) per epoch, from a generator
    seeded with `seed` (independent of the global torch RNG)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


def collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows `prompt + target`, right-padded with `pad_id` to the longest row.

    Returns input_ids [B, L] int64, attention_mask [B, L] int64 (1 on real tokens) and
    loss_mask [B, L] bool (true on target tokens)."""
    length = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, e in enumerate(examples):
        p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.target_ids)
        input_ids[row, :n] = torch.tensor([*e.prompt_ids, *e.target_ids], dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row, p:n] = True
    return dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)


# ---------------------------------------------------------------------------------------------
# Cache key


def _check_examples(examples: Sequence[SFTExample]) -> None:
    if not examples:
        raise ValueError("supervised_finetune: no examples given")
    for i, e in enumerate(examples):
        if not e.target_ids:
            raise ValueError(f"SFT example {i} has an empty target_ids: nothing to learn "
                             "(targets should end with EOS)")
        if not e.prompt_ids:
            raise ValueError(f"SFT example {i} has an empty prompt_ids: the first target token "
                             "needs at least one token before it (e.g. BOS)")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _policy_files(policy_path: str | os.PathLike) -> list[Path]:
    folder = Path(policy_path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not an HF checkpoint folder (no config.json)")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if not any(fnmatch.fnmatch(n, pat) for n in names for pat in _WEIGHT_FILES):
        raise ValueError(f"{folder} holds no weight file ({', '.join(_WEIGHT_FILES)})")
    return [folder / n for n in names if any(fnmatch.fnmatch(n, pat) for pat in _KEY_FILES)]


def _key_settings(settings: WarmStartConfig, seed: int) -> dict:
    """The settings that change the weights. The fixed choices keep their entries (they were
    settings once) so that the warm starts cached before keep their keys."""
    return dict(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
                threads=settings.threads, warmup_steps=settings.warmup_steps, schedule="cosine",
                weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM)


def sft_cache_key(policy_path: str | os.PathLike, examples: Sequence[SFTExample],
                  settings: WarmStartConfig, seed: int) -> str:
    """Hex SHA-256 of everything that determines the fine-tuned weights: the input
    checkpoint's config, weight and tokenizer files (their bytes, by content; not the folder's
    path), the examples in order, the training settings and seed (not split, problems or the
    annotation flaws: the examples carry them), and SFT_FORMAT.
    Library versions are left out (recorded in sft.json instead): an upgrade of torch may
    change the last bits but should not make every cached warm start unusable."""
    validate(settings, "pipeline.warm_start")
    _check_examples(examples)
    files = {p.name: _sha256_file(p) for p in _policy_files(policy_path)}
    ex_digest = hashlib.sha256()
    for e in examples:
        ex_digest.update(json.dumps([list(map(int, e.prompt_ids)),
                                     list(map(int, e.target_ids))]).encode())
        ex_digest.update(b"\n")
    payload = dict(format=SFT_FORMAT, policy_files=files, examples=ex_digest.hexdigest(),
                   n_examples=len(examples), settings=_key_settings(settings, seed))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_finished(out_dir: Path, key: str) -> list[float] | None:
    """Losses of a finished run in `out_dir` with this key; None when out_dir is absent or an
    empty folder. Raises ValueError for a finished run of other inputs or a foreign folder."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ValueError(f"SFT output {out_dir} exists and is not a folder")
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        if not any(out_dir.iterdir()):
            return None
        raise ValueError(f"SFT output {out_dir} exists but is not a finished SFT run (no "
                         f"{META_FILE}); delete it or choose another output folder")
    try:
        meta = json.loads(meta_path.read_text())
        old_key, losses = meta["cache_key"], [float(x) for x in meta["losses"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"SFT output {out_dir}: unreadable {META_FILE} ({exc}); delete the "
                         "folder to retrain") from exc
    if old_key != key:
        raise ValueError(
            f"SFT output {out_dir} holds a finished run whose inputs changed (policy, examples "
            f"or settings; cache key {old_key[:12]}... != {key[:12]}...); delete it to retrain "
            "or choose another output folder")
    return losses


# ---------------------------------------------------------------------------------------------
# Training


def _check_fits(examples: Sequence[SFTExample], config) -> None:
    vocab, max_len = config.vocab_size, getattr(config, "max_position_embeddings", None)
    for i, e in enumerate(examples):
        ids = [*e.prompt_ids, *e.target_ids]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"SFT example {i}: token ids {bad[:5]} outside the vocabulary "
                             f"[0, {vocab})")
        if max_len is not None and len(ids) > max_len:
            raise ValueError(f"SFT example {i}: {len(ids)} tokens, more than the model's "
                             f"max_position_embeddings={max_len}")


def _train(policy_path: str | os.PathLike, examples: Sequence[SFTExample],
           settings: WarmStartConfig, seed: int):
    """Runs the steps under the caller's seed/thread set-up; returns (model, tokenizer,
    losses)."""
    tokenizer = load_tokenizer(policy_path)
    model = load_policy(policy_path, dtype=torch.float32)
    _check_fits(examples, model.config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    order = example_order(len(examples), seed)
    losses: list[float] = []
    window: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for step in range(settings.steps):
        batch = collate([examples[next(order)] for _ in range(settings.batch_size)],
                        tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings.lr, settings.warmup_steps, settings.steps - 1,
                                min_lr_ratio=MIN_LR_RATIO)
        # Right padding: real tokens keep positions 0..n-1 and never attend to the padding.
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits  # [B, L, V]
        loss = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        losses.append(loss.item())
        window.append(losses[-1])
        tokens += int(batch["attention_mask"].sum())
        done = step + 1
        if done % LOG_EVERY == 0 or done == settings.steps:
            elapsed = time.perf_counter() - start
            mean = sum(window) / len(window)
            log.info("sft step %d/%d  loss %.4f  %.0f tok/s  eta %.0fs", done, settings.steps,
                     mean, tokens / max(elapsed, 1e-9),
                     elapsed / done * (settings.steps - done))
            window.clear()
    model.eval()
    return model, tokenizer, losses


def _write_checkpoint(model, tokenizer, policy_path: str | os.PathLike, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    source_gen = Path(policy_path) / "generation_config.json"
    if source_gen.is_file():
        # Keep the input's generation settings byte for byte (eos/pad ids, sampling defaults).
        shutil.copyfile(source_gen, folder / "generation_config.json")


def _write_meta(folder: Path, meta: dict) -> None:
    with open(folder / META_FILE, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _summary(losses: list[float]) -> dict:
    tail = losses[-max(1, len(losses) // 10):]
    return dict(first=losses[0], last=losses[-1], min=min(losses),
                mean_last_10pct=sum(tail) / len(tail))


def supervised_finetune(policy_path: str | os.PathLike, out_dir: str | os.PathLike,
                        examples: Sequence[SFTExample], settings: WarmStartConfig,
                        seed: int) -> SFTResult:
    """Fine-tunes the HF checkpoint at `policy_path` on `examples` and writes it to `out_dir`.

    Reproducible: the same inputs (see `sft_cache_key`) give bitwise-identical weights on the
    same machine and library versions. The run seeds torch with `seed` (inside
    `torch.random.fork_rng`, so the caller's RNG state is untouched), uses settings.threads
    threads (the previous count is restored after) and draws examples from `example_order`.

    Cached: when `out_dir` holds a finished run (its sft.json) with the same cache key, nothing
    is loaded or trained and the stored losses are returned with cached=True.

    When `out_dir` holds a finished run of different inputs, this raises ValueError rather
    than replacing it: the folder is typically the base policy of a run, and trajectories,
    reference log-probs and results already derived from it would silently stop matching the
    weights. Retraining is one `rm -r` away and says so in the message. A non-empty `out_dir`
    without sft.json (not written by this function, which renames only finished folders into
    place) is refused the same way; an empty one is used.

    Progress is logged every LOG_EVERY steps and at the last (mean loss since the last log).
    """
    start = time.perf_counter()
    examples = list(examples)
    key = sft_cache_key(policy_path, examples, settings, seed)  # validates both
    out = Path(out_dir)
    cached = _read_finished(out, key)
    if cached is not None:
        log.info("sft: reusing %s (same inputs, key %s...)", out, key[:12])
        return SFTResult(str(out), cached, True, time.perf_counter() - start)

    log.info("sft: %d examples, %d steps x batch %d -> %s", len(examples), settings.steps,
             settings.batch_size, out)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, tokenizer, losses = _train(policy_path, examples, settings, seed)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.sft-tmp-", dir=out.parent))
    try:
        _write_checkpoint(model, tokenizer, policy_path, tmp)
        _write_meta(tmp, dict(
            cache_key=key, format=SFT_FORMAT, source=str(policy_path),
            settings=_key_settings(settings, seed), n_examples=len(examples),
            target_tokens=sum(len(e.target_ids) for e in examples),
            final_loss=losses[-1], summary=_summary(losses), losses=losses, seconds=seconds,
            versions=dict(torch=torch.__version__,
                          transformers=transformers.__version__)))
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process finished the same run first: identical weights, keep theirs.
            if _read_finished(out, key) is None:
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("sft: wrote %s in %.1fs (loss %.4f -> %.4f)", out, seconds, losses[0], losses[-1])
    return SFTResult(str(out), losses, False, time.perf_counter() - start)
