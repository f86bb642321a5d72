"""Supervised fine-tuning: masked loss, schedule, memorization, bitwise reproducibility, the
cache and its atomic write."""

import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_WORDS
from safetensors.torch import load_file

from dqo_ray.config import ConfigError, WarmStartConfig
from dqo_ray.models import load_policy, load_tokenizer
from dqo_ray.train import sft
from dqo_ray.train.sft import (
    SFTExample,
    collate,
    example_order,
    sft_cache_key,
    sft_loss,
    supervised_finetune,
)

QUICK = WarmStartConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=0, threads=1)


def memorization_set(tokenizer) -> list[SFTExample]:
    """8 prompts 'Tom has i apples' -> ' gives away j left</s>' with distinct j per prompt."""
    assert {"Tom", "gives", "left"} <= set(TINY_WORDS)
    examples = []
    for i in range(8):
        prompt = tokenizer(f"Tom has {i} apples", add_special_tokens=False)["input_ids"]
        target = tokenizer(f" gives away {i * 3 % 10} left", add_special_tokens=False)["input_ids"]
        examples.append(SFTExample(prompt, [*target, tokenizer.eos_token_id]))
    return examples


@pytest.fixture(scope="module")
def examples(tiny_checkpoint):
    return memorization_set(load_tokenizer(tiny_checkpoint))


@pytest.fixture(scope="module")
def memorized(tiny_checkpoint, examples, tmp_path_factory):
    """One 100-step run on the memorization set (about a second), shared by several tests."""
    settings = WarmStartConfig(steps=100, batch_size=8, lr=3e-3, warmup_steps=5, threads=1)
    out = tmp_path_factory.mktemp("sft") / "policy"
    logged = []  # the progress lines, read from the logger
    handler = logging.Handler(logging.INFO)
    handler.emit = logged.append
    logger = logging.getLogger(sft.__name__)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft, "LOG_EVERY", 25)
        patch.setattr(logger, "level", logging.INFO)
        logger.addHandler(handler)
        try:
            result = supervised_finetune(tiny_checkpoint, out, examples, settings, 0)
        finally:
            logger.removeHandler(handler)
    steps = [int(m.group(1)) for r in logged
             if (m := re.match(r"sft step (\d+)/", r.getMessage()))]
    return result, settings, steps


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


# --- pure pieces ----------------------------------------------------------------------------


def test_sft_loss_is_masked_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    B, L, V = 3, 7, 11
    logits = torch.randn(B, L, V, generator=gen, requires_grad=True)
    ids = torch.randint(0, V, (B, L), generator=gen)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 3:6] = True  # prompt 0..2, target 3..5, pad 6
    mask[1, 1:7] = True
    mask[2, 5:6] = True
    loss = sft_loss(logits, ids, mask)

    # Reference: token t is predicted by logits at t - 1, one position at a time.
    terms = [-torch.log_softmax(logits[b, t - 1].double(), -1)[ids[b, t]]
             for b in range(B) for t in range(1, L) if mask[b, t]]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)

    loss.backward()
    scored = mask[:, 1:]  # logits[:, t] is used only when token t + 1 is a target
    assert logits.grad[:, :-1][~scored].abs().max() == 0
    assert logits.grad[:, -1].abs().max() == 0
    assert (logits.grad[:, :-1][scored].abs().sum(-1) > 0).all()

    # Prompt and padding tokens do not enter the loss: change them, same value.
    other = ids.clone()
    other[~mask] = (ids[~mask] + 1) % V
    assert sft_loss(logits, other, mask).item() == loss.item()


def test_sft_loss_is_the_former_masked_cross_entropy_bit_for_bit():
    """sft_loss goes through rft_loss; its value and gradient stay those of the former
    direct formula, to the last bit (cached warm starts were trained with it)."""
    gen = torch.Generator().manual_seed(1)
    for B, L, V in ((3, 7, 11), (8, 40, 300)):
        logits = torch.randn(B, L, V, generator=gen) * 3
        ids = torch.randint(0, V, (B, L), generator=gen)
        mask = torch.rand(B, L, generator=gen) < 0.6
        mask[0, 1] = True
        new = logits.clone().requires_grad_()
        loss = sft_loss(new, ids, mask)
        loss.backward()
        old = logits.clone().requires_grad_()
        pred, weight = old[:, :-1].float(), mask[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(pred.reshape(-1, V), ids[:, 1:].reshape(-1),
                                                reduction="none").reshape(B, L - 1)
        before = (nll * weight).sum() / weight.sum()
        before.backward()
        assert torch.equal(loss, before)
        assert torch.equal(new.grad, old.grad)


def test_sft_loss_rejects_an_empty_mask():
    with pytest.raises(ValueError, match="no predictable token"):
        sft_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long),
                 torch.tensor([[True, False, False]]))


def test_collate_right_pads_and_masks_targets():
    batch = collate([SFTExample([5, 6], [7, 3]), SFTExample([5], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3], [5, 8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]


def test_example_order_is_seeded_epochs_of_permutations():
    def take(seed, n):
        order = example_order(5, seed)
        return [next(order) for _ in range(n)]

    stream = take(0, 15)
    for epoch in range(3):
        assert sorted(stream[5 * epoch: 5 * epoch + 5]) == list(range(5))
    assert stream == take(0, 15)
    assert stream != take(1, 15)


# --- training -------------------------------------------------------------------------------


def test_memorizes_a_small_set(memorized, examples):
    result, settings, calls = memorized
    assert not result.cached
    assert len(result.losses) == settings.steps
    assert result.losses[-1] < 0.1 * result.losses[0]
    assert calls == [25, 50, 75, 100]  # progress lines

    model = load_policy(result.checkpoint)
    model.eval()
    for e in examples:
        out = model.generate(torch.tensor([e.prompt_ids]), attention_mask=torch.ones(
            1, len(e.prompt_ids), dtype=torch.long), max_new_tokens=len(e.target_ids) + 3,
            do_sample=False)
        assert out[0, len(e.prompt_ids):].tolist() == e.target_ids  # stops at EOS


def test_output_folder_is_a_complete_checkpoint(memorized, tiny_checkpoint, examples):
    result, settings, _ = memorized
    out = Path(result.checkpoint)
    tok = load_tokenizer(out)
    assert tok.get_vocab() == load_tokenizer(tiny_checkpoint).get_vocab()
    assert ((out / "generation_config.json").read_bytes()
            == (tiny_checkpoint / "generation_config.json").read_bytes())
    meta = json.loads((out / "sft.json").read_text())
    assert meta["cache_key"] == sft_cache_key(tiny_checkpoint, examples, settings, 0)
    assert meta["losses"] == result.losses
    assert meta["final_loss"] == result.losses[-1]
    assert meta["settings"]["steps"] == settings.steps
    assert not [p for p in out.parent.iterdir() if "sft-tmp" in p.name]


def test_second_call_reuses_the_finished_run(memorized, tiny_checkpoint, examples,
                                             monkeypatch):
    result, settings, _ = memorized
    out = Path(result.checkpoint)
    before = (out / "model.safetensors").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run must not load or train a model")

    monkeypatch.setattr(sft, "_train", no_training)
    monkeypatch.setattr(sft, "load_policy", no_training)
    # logging only changes logging: still the same run
    monkeypatch.setattr(sft, "LOG_EVERY", 7)
    again = supervised_finetune(tiny_checkpoint, out, examples, settings, 0)
    assert again.cached
    assert again.checkpoint == result.checkpoint
    assert again.losses == result.losses
    assert (out / "model.safetensors").read_bytes() == before


def test_changed_inputs_are_refused_not_reused(memorized, tiny_checkpoint, examples):
    result, settings, _ = memorized
    with pytest.raises(ValueError, match="inputs changed") as err:
        supervised_finetune(tiny_checkpoint, result.checkpoint, examples,
                            replace(settings, steps=settings.steps + 1), 0)
    assert result.checkpoint in str(err.value)


def test_two_runs_are_bitwise_identical(tiny_checkpoint, examples, tmp_path, caplog,
                                        monkeypatch):
    # The caller's thread count and RNG stream are left as they were. (The count is not set
    # here: once vLLM has run in this process, it turns torch.set_num_threads into a no-op.)
    threads_before = torch.get_num_threads()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    monkeypatch.setattr(sft, "LOG_EVERY", 2)
    with caplog.at_level(logging.INFO, logger="dqo_ray.train.sft"):
        a = supervised_finetune(tiny_checkpoint, tmp_path / "a", examples, QUICK, 0)
    assert torch.get_num_threads() == threads_before
    assert torch.equal(torch.get_rng_state(), rng_before)
    steps = [r.getMessage() for r in caplog.records if "sft step" in r.getMessage()]
    assert [m.split()[2] for m in steps] == ["2/4", "4/4"]
    assert all("tok/s" in m and "eta" in m for m in steps)

    b = supervised_finetune(tiny_checkpoint, tmp_path / "b", examples, QUICK, 0)
    supervised_finetune(tiny_checkpoint, tmp_path / "c", examples, QUICK, 1)
    assert not (a.cached or b.cached)
    assert a.losses == b.losses
    wa, wb, wc = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters (example order)


def test_cache_key_covers_policy_examples_and_settings(tiny_checkpoint, examples, tmp_path):
    key = sft_cache_key(tiny_checkpoint, examples, QUICK, 0)
    assert len(key) == 64 and key == sft_cache_key(tiny_checkpoint, list(examples), QUICK, 0)
    # The folder's location and the settings that only choose the examples do not matter ...
    moved = shutil.copytree(tiny_checkpoint, tmp_path / "moved")
    assert sft_cache_key(moved, examples, replace(QUICK, split="train", problems=7), 0) == key
    # ... the training settings, seed, examples, their order and the checkpoint's bytes do.
    changed = [(replace(QUICK, lr=1e-3), 0), (QUICK, 1), (replace(QUICK, steps=5), 0),
               (replace(QUICK, threads=2), 0), (replace(QUICK, warmup_steps=1), 0),
               (replace(QUICK, batch_size=3), 0)]
    keys = {sft_cache_key(tiny_checkpoint, examples, s, seed) for s, seed in changed}
    assert len(keys) == len(changed) and key not in keys
    first = examples[0]
    for other in ([SFTExample(first.prompt_ids, first.target_ids[1:]), *examples[1:]],
                  [*examples[1:], first], examples[:-1]):
        assert sft_cache_key(tiny_checkpoint, other, QUICK, 0) != key
    config = json.loads((moved / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (moved / "config.json").write_text(json.dumps(config))
    assert sft_cache_key(moved, examples, QUICK, 0) != key
    shutil.copy(tiny_checkpoint / "config.json", moved / "config.json")
    blob = bytearray((moved / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (moved / "model.safetensors").write_bytes(bytes(blob))
    assert sft_cache_key(moved, examples, QUICK, 0) != key


def test_cache_key_hashes_the_former_settings():
    """The key hashes the settings under their former SFTSettings names, fixed choices
    included, so warm starts cached before the settings moved into WarmStartConfig keep it."""
    assert sft._key_settings(QUICK, 3) == dict(
        steps=4, batch_size=4, lr=3e-3, seed=3, threads=1, warmup_steps=0, schedule="cosine",
        weight_decay=0.0, max_grad_norm=1.0)


def test_an_interrupted_write_is_not_taken_for_a_finished_run(tiny_checkpoint, examples,
                                                              tmp_path, monkeypatch):
    out = tmp_path / "policy"

    def crash(folder, meta):
        raise KeyboardInterrupt

    # Killed after the weights were written but before sft.json: nothing at out_dir, no debris.
    monkeypatch.setattr(sft, "_write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        supervised_finetune(tiny_checkpoint, out, examples, QUICK, 0)
    monkeypatch.undo()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    # A hard kill leaves a hidden temporary sibling, even one with an sft.json: never read.
    leftover = tmp_path / ".policy.sft-tmp-dead"
    shutil.copytree(tiny_checkpoint, leftover)
    key = sft_cache_key(tiny_checkpoint, examples, QUICK, 0)
    (leftover / "sft.json").write_text(json.dumps(dict(cache_key=key, losses=[0.0])))
    result = supervised_finetune(tiny_checkpoint, out, examples, QUICK, 0)
    assert not result.cached and len(result.losses) == QUICK.steps
    assert (out / "sft.json").is_file()

    # A checkpoint-looking out_dir without sft.json is refused, not reused or overwritten.
    foreign = shutil.copytree(tiny_checkpoint, tmp_path / "foreign")
    with pytest.raises(ValueError, match="not a finished SFT run"):
        supervised_finetune(tiny_checkpoint, foreign, examples, QUICK, 0)
    assert not (foreign / "sft.json").exists()

    # An empty out_dir (made ahead by a caller) is simply filled.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not supervised_finetune(tiny_checkpoint, empty, examples, QUICK, 0).cached
    assert (empty / "sft.json").is_file()


def test_clear_errors(tiny_checkpoint, examples, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="no examples"):
        supervised_finetune(tiny_checkpoint, out, [], QUICK, 0)
    with pytest.raises(ValueError, match="example 1 has an empty target_ids"):
        supervised_finetune(tiny_checkpoint, out, [examples[0], SFTExample([5], [])], QUICK,
                            0)
    with pytest.raises(ValueError, match="example 0 has an empty prompt_ids"):
        supervised_finetune(tiny_checkpoint, out, [SFTExample([], [5])], QUICK, 0)
    # Settings made in code are checked at the call by the config's own rules.
    with pytest.raises(ConfigError, match=r"(?s)pipeline.warm_start.steps: 0 must be >= 1"
                                          r".*pipeline.warm_start.lr: 0.0 must be > 0"):
        supervised_finetune(tiny_checkpoint, out, examples, replace(QUICK, steps=0, lr=0), 0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        supervised_finetune(tiny_checkpoint, out, [SFTExample([5], [10**6])], QUICK, 0)
    with pytest.raises(ValueError, match="not an HF checkpoint folder"):
        supervised_finetune(tmp_path, out, examples, QUICK, 0)
    assert not out.exists()
