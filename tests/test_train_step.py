"""The plain train step on the tiny Llama: collation, alignment, padding invariance."""

import math

import numpy as np
import pytest
import torch

from dqo_ray.config import AlgoConfig
from dqo_ray.data.batch import pad_trajectories
from dqo_ray.models import load_policy, load_value
from dqo_ray.models.forward import sequence_logprobs
from dqo_ray.train.step import loss_on_batch


def make_rows(seed, n=3, vocab=30):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p, r = 2 + 3 * i, 4 + 2 * i
        rows.append({
            "traj_id": f"t{i}",
            "prompt_ids": torch.randint(4, vocab, (p,), generator=gen).tolist(),
            "response_ids": torch.randint(4, vocab, (r,), generator=gen).tolist(),
            "behaviour_logprobs": (-torch.rand(r, generator=gen) * 3).tolist(),
            "ref_logprobs": (-torch.rand(r, generator=gen) * 3).tolist(),
            "reward": float(i % 2), "finish_reason": "length" if i == 2 else "stop",
            "step_ends": [0], "step_rewards": [0.25],
        })
    return rows


def test_collate_places_tokens_and_rewards():
    rows = make_rows(0)
    for side in ("right", "left"):
        b = pad_trajectories(rows, pad_id=0, side=side, pad_to_multiple=8)
        assert b["input_ids"].shape == (3, 16)
        for i, row in enumerate(rows):
            resp = b["input_ids"][i][b["response_mask"][i]].tolist()
            assert resp == row["response_ids"]
            seq = b["input_ids"][i][b["attention_mask"][i]].tolist()
            assert seq == row["prompt_ids"] + row["response_ids"]
            got = b["behaviour_logprobs"][i][b["response_mask"][i]]
            torch.testing.assert_close(got, torch.tensor(row["behaviour_logprobs"]))
            r = b["rewards"][i][b["response_mask"][i]]
            assert r[0].item() == 0.25 and r[-1].item() == row["reward"]
        assert b["truncated"].tolist() == [False, False, True]
        assert b["returns"].tolist() == [0.25, 1.25, 0.25]


def test_collate_names_the_bad_row():
    rows = make_rows(0)
    rows[1]["ref_logprobs"] = rows[1]["ref_logprobs"][:-1]
    with pytest.raises(ValueError, match=r"trajectory t1: ref_logprobs has 5 entries for 6"):
        pad_trajectories(rows, pad_id=0)
    rows = make_rows(0)
    rows[2]["step_ends"] = [99]
    with pytest.raises(ValueError, match=r"trajectory t2: step_ends entry 99 is outside"):
        pad_trajectories(rows, pad_id=0)


def test_collate_spreads_step_values_over_their_steps():
    rows = make_rows(0)  # responses of 4, 6, 8 tokens
    for row, ends, values in zip(rows, ([1, 3], [0, 2, 5], [7]),
                                 ([0.25, 0.5], [0.0, 0.5, 1.0], [0.75]), strict=True):
        row.update(step_ends=ends, step_rewards=[0.0] * len(ends), step_values=values)
    for side in ("right", "left"):
        b = pad_trajectories(rows, pad_id=0, side=side, pad_to_multiple=8)
        got = [b["step_values"][i][b["response_mask"][i]].tolist() for i in range(3)]
        assert got == [[0.25, 0.25, 0.5, 0.5], [0.0, 0.5, 0.5, 1.0, 1.0, 1.0], [0.75] * 8]
        starts = [b["step_starts"][i][b["response_mask"][i]].nonzero().flatten().tolist()
                  for i in range(3)]
        assert starts == [[0, 2], [0, 1, 3], [0]]
        assert not (b["step_starts"] & ~b["response_mask"]).any()
    # Ray Data hands list columns over as numpy arrays
    as_arrays = [{k: np.asarray(v) if isinstance(v, list) else v for k, v in row.items()}
                 for row in rows]
    b = pad_trajectories(as_arrays, pad_id=0)
    assert b["step_values"][0][b["response_mask"][0]].tolist() == [0.25, 0.25, 0.5, 0.5]
    assert b["returns"].tolist() == [0.0, 1.0, 0.0]
    rows[1]["step_ends"] = [0, 2, 4]
    with pytest.raises(ValueError, match=r"trajectory t1: step_ends must end at the last "):
        pad_trajectories(rows, pad_id=0)
    rows[1].update(step_ends=[0, 5], step_rewards=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"trajectory t1: step_values needs one step_ends "):
        pad_trajectories(rows, pad_id=0)
    del rows[1]["step_values"]  # one row without: no step fields for the batch
    assert "step_values" not in pad_trajectories(rows, pad_id=0)


def test_mc_step_values_train_the_policy_alone_on_whole_steps(tiny_checkpoint):
    policy, _ = models(tiny_checkpoint)
    rows = make_rows(3)
    for row in rows:
        n = len(row["response_ids"])
        row.update(step_ends=[1, n - 1], step_rewards=[0.0, 0.0], step_values=[0.5, 0.25])
    batch = pad_trajectories(rows, pad_id=0, side="left", pad_to_multiple=8)
    cfg = AlgoConfig(beta=0.2, step_values="mc", kl_coef=0)  # the KL term: its own test
    out = loss_on_batch(policy, None, batch, cfg)
    mask = batch["response_mask"][:, 1:]
    with torch.no_grad():
        lp = sequence_logprobs(policy, batch["input_ids"], batch["attention_mask"])
    ratios = [(lp - batch["ref_logprobs"][:, 1:])[i][mask[i]] for i in range(3)]
    v0, v1 = (0.2 * math.log(1 - p + p * math.exp(1 / 0.2)) for p in (0.5, 0.25))
    eps = []
    for i, (row, ratio) in enumerate(zip(rows, ratios, strict=True)):
        reward = 0.0 if row["finish_reason"] == "length" else row["reward"]  # truncated: 0
        eps += [0.2 * ratio[:2].sum() + v0 - v1, 0.2 * ratio[2:].sum() + v1 - reward]
        assert batch["truncated"][i].item() == (i == 2)
    torch.testing.assert_close(out.loss.detach(), torch.stack(eps).square().mean(),
                               rtol=1e-5, atol=1e-6)
    assert out.value_loss is None and not cfg.has_value_model
    out.loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    del batch["step_values"]
    with pytest.raises(ValueError, match="step_values='mc' needs step_values in every"):
        loss_on_batch(policy, None, batch, cfg)


def test_sequence_logprobs_match_unpadded_forward(tiny_checkpoint):
    policy = load_policy(tiny_checkpoint).eval()
    rows = make_rows(1)
    b = pad_trajectories(rows, pad_id=0, side="left")
    with torch.no_grad():
        batched = sequence_logprobs(policy, b["input_ids"], b["attention_mask"])
        for i, row in enumerate(rows):
            ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
            logits = policy(input_ids=ids).logits[0, :-1]
            ref = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            n = len(row["response_ids"])
            torch.testing.assert_close(batched[i][b["response_mask"][i, 1:]], ref[-n:],
                                       rtol=1e-4, atol=1e-5)


def models(checkpoint):
    policy, value = load_policy(checkpoint).eval(), load_value(None, checkpoint).eval()
    torch.nn.init.normal_(value.value_head.weight, std=0.1)  # non-zero values
    return policy, value


def moved_reference(checkpoint):
    """A pi_ref that differs from the policy, so the full-vocabulary KL term is not zero."""
    reference = load_policy(checkpoint).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reference


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("truncated_response", ["zero", "bootstrap"])
def test_dqo_row_terms_identical_alone_or_batched(tiny_checkpoint, side, truncated_response):
    policy, value = models(tiny_checkpoint)
    cfg = AlgoConfig(beta=0.2, lam=0.9, truncated_response=truncated_response)
    reference = moved_reference(tiny_checkpoint)
    rows = make_rows(2)  # row 2 is the longest and truncated; row 0 the shortest
    with torch.no_grad():
        for i in range(len(rows)):
            alone_batch = pad_trajectories([rows[i]], pad_id=0, side=side)
            full_batch = pad_trajectories(rows, pad_id=0, side=side)
            alone = loss_on_batch(policy, value, alone_batch, cfg, reference)
            full = loss_on_batch(policy, value, full_batch, cfg, reference)
            m1, m2 = alone_batch["response_mask"][0, 1:], full_batch["response_mask"][i, 1:]
            for terms in ("policy_terms", "value_terms"):
                a, b = getattr(alone, terms)[0][m1], getattr(full, terms)[i][m2]
                assert a.abs().sum() > 0
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["dqo", "dro", "rft", "dpo"])
def test_losses_do_not_depend_on_padding_side(tiny_checkpoint, name):
    policy, value = models(tiny_checkpoint)
    cfg = AlgoConfig(name=name, beta=0.2)  # dqo: with the full-vocabulary KL term
    reference = moved_reference(tiny_checkpoint)
    rows = make_rows(4, n=4)
    with torch.no_grad():
        right = loss_on_batch(policy, value, pad_trajectories(rows, 0, "right"), cfg, reference)
        left = loss_on_batch(policy, value, pad_trajectories(rows, 0, "left", 8), cfg, reference)
    assert right.loss.item() == pytest.approx(left.loss.item(), rel=1e-4)
    assert right.loss.item() != 0


def test_truncated_response_zero_drops_reward(tiny_checkpoint):
    policy, value = models(tiny_checkpoint)
    rows = make_rows(3)
    rows[2]["reward"] = 1.0  # a truncated row with a (spurious) positive reward
    cfg = AlgoConfig(beta=0.2, lam=1.0, off_policy="none", kl_coef=0)
    with torch.no_grad():
        b = pad_trajectories(rows, pad_id=0)
        zero = loss_on_batch(policy, value, b, cfg)
        b_no_reward = pad_trajectories([*rows[:2], {**rows[2], "reward": 0.0}], pad_id=0)
        same = loss_on_batch(policy, value, b_no_reward, cfg)
    torch.testing.assert_close(zero.policy_terms, same.policy_terms)


def test_stale_extension_build_lock_is_cleared(tmp_path, monkeypatch):
    """A process killed while torch's JIT loader held its build lock must not hang every
    later DeepSpeed start (the lock is a bare file with no owner to check)."""
    import os
    import time

    from dqo_ray.train.train_engine import clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "dqo_test_op"
    folder.mkdir()
    lock = folder / "lock"

    def aged(seconds: float) -> None:
        lock.touch()
        past = time.time() - seconds
        os.utime(lock, (past, past))

    aged(5)  # fresh: someone may be checking the build right now
    assert not clear_stale_build_lock("dqo_test_op") and lock.exists()
    aged(120)  # nothing built yet: a real compile may take minutes
    assert not clear_stale_build_lock("dqo_test_op") and lock.exists()
    (folder / "dqo_test_op.so").touch()  # built: the up-to-date check takes under a second
    assert clear_stale_build_lock("dqo_test_op") and not lock.exists()
    aged(1000)
    (folder / "dqo_test_op.so").unlink()
    assert clear_stale_build_lock("dqo_test_op") and not lock.exists()
    assert not clear_stale_build_lock("dqo_test_op")  # no lock at all


def test_kl_term_uses_the_reference_forward_on_response_tokens(tiny_checkpoint):
    policy, value = models(tiny_checkpoint)
    batch = pad_trajectories(make_rows(5, n=3), pad_id=0, side="left", pad_to_multiple=8)
    cfg = AlgoConfig(beta=0.2, off_policy="none", kl_coef=0.5)
    plain = loss_on_batch(policy, value, batch, AlgoConfig(beta=0.2, off_policy="none",
                                                           kl_coef=0))
    same = loss_on_batch(policy, value, batch, cfg, reference=load_policy(tiny_checkpoint))
    assert same.metrics["kl_full"].item() == pytest.approx(0, abs=1e-6)  # pi_ref == pi_theta
    torch.testing.assert_close(same.policy_loss, plain.policy_loss)

    other = moved_reference(tiny_checkpoint)
    moved = loss_on_batch(policy, value, batch, cfg, reference=other)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["response_mask"][:, 1:]
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=ids, attention_mask=attn, position_ids=(
            attn.long().cumsum(-1) - 1).clamp(min=0)).logits[:, :-1], -1)
        logq = torch.log_softmax(other(input_ids=ids, attention_mask=attn, position_ids=(
            attn.long().cumsum(-1) - 1).clamp(min=0)).logits[:, :-1], -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)[mask].mean()
    assert kl.item() > 1e-3
    torch.testing.assert_close(moved.metrics["kl_full"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(moved.policy_loss.detach(), plain.policy_loss.detach() + 0.5 * kl,
                               rtol=1e-4, atol=1e-6)
    assert 0 < moved.metrics["entropy"].item()
    with pytest.raises(ValueError, match="kl_coef > 0 needs the reference model"):
        loss_on_batch(policy, value, batch, cfg)


class Untouchable(torch.nn.Module):
    """A pi_ref that must not run."""

    def forward(self, *args, **kwargs):
        raise AssertionError("pi_ref ran during the value warm-up")


def test_value_warmup_step_runs_no_policy_gradient_no_reference_and_the_same_value_loss(
        tiny_checkpoint):
    """trainer.value_warmup_steps: the value model's loss and gradients are those of a full
    step; the policy's forward keeps no graph, and neither pi_ref nor the KL runs."""
    policy, value = models(tiny_checkpoint)
    batch = pad_trajectories(make_rows(6, n=3), pad_id=0, side="right")
    cfg = AlgoConfig(beta=0.2, off_policy="truncated", kl_coef=0.5, lam=0.9)
    full = loss_on_batch(policy, value, batch, cfg, reference=moved_reference(tiny_checkpoint))
    full.value_loss.backward()
    full_grads = [p.grad.clone() for p in value.parameters()]
    value.zero_grad()
    warm = loss_on_batch(policy, value, batch, cfg, reference=Untouchable(),
                         train_policy=False)
    assert not warm.policy_loss.requires_grad and "kl_full" not in warm.metrics
    torch.testing.assert_close(warm.value_loss, full.value_loss, rtol=0, atol=0)
    warm.value_loss.backward()
    for grad, want in zip((p.grad for p in value.parameters()), full_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)
    assert all(p.grad is None for p in policy.parameters())
