"""DQO and baseline losses: gradient routing, exact values, padding invariance, log-probs."""

import math

import pytest
import torch
import torch.nn.functional as F
from tabular import random_tree, sample_dataset

from dqo_ray.algo import (
    dpo_loss,
    dqo_loss,
    dqo_step_loss,
    dro_loss,
    entropy,
    full_kl,
    lambda_returns,
    rft_loss,
    token_logprobs,
)
from dqo_ray.algo.dqo import explained_variance
from dqo_ray.config import AlgoConfig

MODES = ["none", "truncated", "sequence"]


def batch(seed=0, b=4, t=6, vocab=5, dim=3):
    """A batch produced by small real modules: a linear policy head and a linear value head."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, t, dim, generator=gen)
    tokens = torch.randint(0, vocab, (b, t), generator=gen)
    lengths = torch.tensor([t, t - 2, 1, t - 1])[:b]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    policy = torch.nn.Linear(dim, vocab)
    value = torch.nn.Linear(dim, 1)
    with torch.no_grad():
        for p in [*policy.parameters(), *value.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen))
    ref_lp = -torch.rand(b, t, generator=gen) * 2
    behaviour_lp = -torch.rand(b, t, generator=gen) * 2
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = torch.randint(0, 2, (b,), generator=gen).float()
    return feats, tokens, mask, policy, value, ref_lp, behaviour_lp, rewards


def run(policy, value, feats, tokens, mask, ref_lp, behaviour_lp, rewards, cfg):
    policy_lp = token_logprobs(policy(feats), tokens)
    values = value(feats).squeeze(-1)
    return dqo_loss(policy_lp, ref_lp, behaviour_lp, values, rewards, mask, cfg)


def grads(module, loss):
    g = torch.autograd.grad(loss, list(module.parameters()), retain_graph=True,
                            allow_unused=True)
    return [torch.zeros_like(p) if x is None else x for p, x in zip(module.parameters(), g,
                                                                      strict=True)]


@pytest.mark.parametrize("off_policy", MODES)
def test_gradients_reach_only_intended_parameters(off_policy):
    feats, tokens, mask, policy, value, ref_lp, beh_lp, rewards = batch()
    outs = {c: run(policy, value, feats, tokens, mask, ref_lp, beh_lp, rewards,
                   AlgoConfig(beta=0.3, lam=0.7, off_policy=off_policy, value_coef=c))
            for c in (0.0, 1.0, 2.0)}
    # L_pi alone (c_V = 0) sends nothing to the value model ...
    assert all(torch.count_nonzero(g) == 0 for g in grads(value, outs[0.0].loss))
    # ... and L_V sends nothing to the policy: policy grads do not depend on c_V.
    for g0, g2 in zip(grads(policy, outs[0.0].loss), grads(policy, outs[2.0].loss), strict=True):
        assert torch.count_nonzero(g0) > 0
        torch.testing.assert_close(g0, g2, rtol=0, atol=0)
    # value grads are exactly linear in c_V (only L_V reaches them)
    for g1, g2 in zip(grads(value, outs[1.0].loss), grads(value, outs[2.0].loss), strict=True):
        assert torch.count_nonzero(g1) > 0
        torch.testing.assert_close(2 * g1, g2, rtol=1e-6, atol=1e-7)


def test_policy_gradient_treats_targets_as_constants():
    """d L_pi / d log pi(a_h) = 2 beta eps_h / N (token mean): no gradient through Q^lam or V."""
    feats, tokens, mask, policy, value, ref_lp, beh_lp, rewards = batch(seed=1)
    cfg = AlgoConfig(beta=0.4, lam=0.5, off_policy="none", value_coef=0.0)
    policy_lp = token_logprobs(policy(feats), tokens).detach().requires_grad_(True)
    values = value(feats).squeeze(-1).detach()
    out = dqo_loss(policy_lp, ref_lp, beh_lp, values, rewards, mask, cfg)
    (grad,) = torch.autograd.grad(out.loss, policy_lp)
    log_ratio = (policy_lp - ref_lp).detach()
    q, _ = lambda_returns(rewards, values, log_ratio, mask, beta=cfg.beta, lam=cfg.lam)
    eps = cfg.beta * log_ratio + values - q
    expected = 2 * cfg.beta * eps * mask / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_loss_values_match_definition():
    feats, tokens, mask, policy, value, ref_lp, beh_lp, rewards = batch(seed=2)
    with torch.no_grad():
        policy_lp = token_logprobs(policy(feats), tokens)
        values = value(feats).squeeze(-1)
    for off_policy in MODES:
        cfg = AlgoConfig(beta=0.25, lam=0.9, off_policy=off_policy, value_coef=0.5,
                         trace_clip=0.8, sequence_weight_clip=1.5)
        out = dqo_loss(policy_lp, ref_lp, beh_lp, values, rewards, mask, cfg)
        log_ratio = policy_lp - ref_lp
        log_rho = (policy_lp - beh_lp) * mask
        trace = log_rho.exp().clamp(max=0.8) if off_policy == "truncated" else None
        w = torch.ones_like(log_ratio)
        if off_policy == "sequence":
            w = torch.exp(torch.clamp(log_rho.sum(-1), max=math.log(1.5)))[:, None].expand_as(log_ratio)
        q, g = lambda_returns(rewards, values, log_ratio, mask, beta=0.25, lam=0.9, trace=trace)
        n = mask.sum()
        lp = (w * (0.25 * log_ratio + values - q) ** 2 * mask).sum() / n
        lv = (w * (values - g) ** 2 * mask).sum() / n
        assert out.loss.item() == pytest.approx((lp + 0.5 * lv).item(), rel=1e-5)
        assert out.metrics["policy_loss"].item() == pytest.approx(lp.item(), rel=1e-5)
        assert out.metrics["kl_k1"].item() == pytest.approx((log_ratio * mask).sum().item() / n.item(), rel=1e-5)


def test_sequence_reduction_is_mean_of_row_means():
    feats, tokens, mask, policy, value, ref_lp, beh_lp, rewards = batch(seed=3)
    cfg_tok = AlgoConfig(off_policy="none", reduction="token", value_coef=0.0)
    cfg_seq = AlgoConfig(off_policy="none", reduction="sequence", value_coef=0.0)
    tok = run(policy, value, feats, tokens, mask, ref_lp, beh_lp, rewards, cfg_tok)
    seq = run(policy, value, feats, tokens, mask, ref_lp, beh_lp, rewards, cfg_seq)
    terms = tok.policy_terms
    expected = (terms.sum(-1) / mask.sum(-1)).mean()
    assert seq.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert tok.loss.item() == pytest.approx((terms.sum() / mask.sum()).item(), rel=1e-6)


def pad_rows(x, n, length, left, fill):
    out = torch.full((length,), fill, dtype=x.dtype)
    if left:
        out[length - n:] = x[:n]
    else:
        out[:n] = x[:n]
    return out


@pytest.mark.parametrize("off_policy", MODES)
@pytest.mark.parametrize("left", [False, True])
def test_padding_invariance(off_policy, left):
    """A sequence's per-token loss terms are the same alone or batched with longer ones."""
    gen = torch.Generator().manual_seed(11)
    lengths, length = [3, 7, 5], 7
    seqs = [{k: torch.randn(n, generator=gen) for k in ("pol", "ref", "beh", "val", "rew")}
            for n in lengths]
    cfg = AlgoConfig(beta=0.2, lam=0.8, off_policy=off_policy, sequence_weight_clip=3.0)

    def loss_of(rows, t, pad_left):
        fills = {"pol": -9.0, "ref": 4.0, "beh": 2.0, "val": 50.0, "rew": 7.0}  # junk padding
        cols = {k: torch.stack([pad_rows(s[k], len(s["pol"]), t, pad_left, fills[k])
                                for s in rows]) for k in fills}
        mask = torch.stack([pad_rows(torch.ones(len(s["pol"]), dtype=torch.bool),
                                     len(s["pol"]), t, pad_left, False) for s in rows])
        out = dqo_loss(cols["pol"], cols["ref"], cols["beh"], cols["val"], cols["rew"], mask, cfg)
        return out, mask

    alone, alone_mask = loss_of([seqs[0]], lengths[0], left)
    batched, batched_mask = loss_of(seqs, length, left)
    for terms in ("policy_terms", "value_terms"):
        a = getattr(alone, terms)[0][alone_mask[0]]
        b = getattr(batched, terms)[0][batched_mask[0]]
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.all(getattr(batched, terms)[~batched_mask] == 0)


@pytest.mark.parametrize("off_policy", MODES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_loss_is_zero_at_the_soft_optimum(off_policy, lam):
    tree = random_tree(vocab=3, depth=3, beta=0.5, seed=5)
    data = sample_dataset(tree, n=200, seed=5)
    pi_star, v_star = tree.soft_optimal()
    idx, act = data["state_idx"], data["action"]
    out = dqo_loss(torch.log(pi_star)[idx, act], data["ref_lp"], data["behaviour_lp"],
                   v_star[idx], data["reward"], data["mask"],
                   AlgoConfig(beta=0.5, lam=lam, off_policy=off_policy))
    assert out.loss.item() < 1e-20
    # At the optimum V_phi is its own target: the value explains all of the return's variance.
    assert out.metrics["value_explained_var"].item() == pytest.approx(1.0, abs=1e-6)


def test_explained_variance_over_valid_tokens_only():
    gen = torch.Generator().manual_seed(3)
    target, prediction = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    t, p = target[mask].double(), prediction[mask].double()
    expected = 1 - (t - p).var(unbiased=False) / t.var(unbiased=False)
    assert explained_variance(prediction, target, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    # Padding may hold anything; a constant prediction explains nothing; the target, everything.
    garbage = torch.where(mask, prediction, torch.full_like(prediction, 1e6))
    assert explained_variance(garbage, target, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert explained_variance(torch.full_like(target, 0.3), target, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(target, target, mask).item() == pytest.approx(1.0)


def test_token_logprobs_equals_log_softmax_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 11), generator=gen)
    for temperature in (1.0, 0.7):
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None])[..., 0]
        got = token_logprobs(logits, tokens, temperature=temperature, chunk_tokens=4)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        g_ref = torch.autograd.grad(ref.sum(), logits)[0]
        g_got = torch.autograd.grad(got.sum(), logits)[0]
        torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(logits, tokens, temperature=0.0)


def test_rft_is_nll_of_correct_rows():
    lp = -torch.rand(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    correct = torch.tensor([True, False, True])
    out = rft_loss(lp, mask, correct)
    expected = -(lp[0, :3].sum() + lp[2].sum()) / 7
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_dpo_matches_formula_and_needs_pairs():
    gen = torch.Generator().manual_seed(1)
    pol, ref = -torch.rand(4, 5, generator=gen), -torch.rand(4, 5, generator=gen)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = dpo_loss(pol, ref, mask, beta=0.1)
    s = ((pol - ref) * mask).sum(-1)
    expected = -(F.logsigmoid(0.1 * (s[0] - s[1])) + F.logsigmoid(0.1 * (s[2] - s[3]))) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="even number of rows"):
        dpo_loss(pol[:3], ref[:3], mask[:3], beta=0.1)


def test_dro_value_and_gradient_routing():
    gen = torch.Generator().manual_seed(2)
    pol = (-torch.rand(3, 4, generator=gen)).requires_grad_(True)
    ref = -torch.rand(3, 4, generator=gen)
    v = torch.randn(3, generator=gen, requires_grad=True)
    ret = torch.tensor([1.0, 0.0, 1.0])
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = dro_loss(pol, ref, v, ret, mask, beta=0.5, value_coef=0.0)
    s = (pol - ref).sum(-1)
    assert out.loss.item() == pytest.approx((0.5 * (0.5 * s + v - ret) ** 2).mean().item())
    g_pol, g_v = torch.autograd.grad(out.loss, [pol, v], allow_unused=True)
    assert g_v is None or torch.count_nonzero(g_v) == 0
    assert torch.count_nonzero(g_pol) > 0


def test_loss_parts_sum_to_total_and_route_separately():
    feats, tokens, mask, policy, value, ref_lp, beh_lp, rewards = batch(seed=4)
    out = run(policy, value, feats, tokens, mask, ref_lp, beh_lp, rewards,
              AlgoConfig(value_coef=0.7))
    assert out.loss.item() == pytest.approx((out.policy_loss + out.value_loss).item())
    assert all(torch.count_nonzero(g) == 0 for g in grads(value, out.policy_loss))
    assert all(torch.count_nonzero(g) == 0 for g in grads(policy, out.value_loss))


def test_full_kl_and_entropy_match_torch_distributions():
    gen = torch.Generator().manual_seed(3)
    logits, ref = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    p, q = torch.distributions.Categorical(logits=logits), torch.distributions.Categorical(logits=ref)
    torch.testing.assert_close(full_kl(logits, ref), torch.distributions.kl_divergence(p, q))
    torch.testing.assert_close(entropy(logits), p.entropy())
    torch.testing.assert_close(full_kl(ref, ref), torch.zeros(2, 3), atol=1e-6, rtol=0)


def test_kl_term_adds_coef_times_mean_kl_to_the_policy_loss_only():
    feats, tokens, mask, policy, value, ref_lp, behaviour_lp, rewards = batch()
    ref_head = torch.nn.Linear(feats.shape[-1], 5)
    cfg = AlgoConfig(beta=0.3, off_policy="none", kl_coef=0.25)
    logits = policy(feats)
    kl = full_kl(logits, ref_head(feats).detach()) * mask
    args = (token_logprobs(logits, tokens), ref_lp, behaviour_lp, value(feats).squeeze(-1),
            rewards, mask, cfg)
    plain, with_kl = dqo_loss(*args), dqo_loss(*args, full_kl=kl)
    expected_kl = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(with_kl.metrics["kl_full"], expected_kl.detach())
    torch.testing.assert_close(with_kl.policy_loss, plain.policy_loss + 0.25 * expected_kl)
    torch.testing.assert_close(with_kl.value_loss, plain.value_loss)
    # The term's gradient reaches the policy head and is the KL's own gradient.
    (grad_kl,) = torch.autograd.grad(with_kl.policy_loss - plain.policy_loss, policy.weight,
                                     retain_graph=True)
    (grad_ref,) = torch.autograd.grad(0.25 * expected_kl, policy.weight)
    torch.testing.assert_close(grad_kl, grad_ref)


def step_layout(mask: torch.Tensor, every: int) -> torch.Tensor:
    """[B, T] bool: a step starts at every `every`-th valid token of each row."""
    rank = mask.long().cumsum(-1) - 1  # index of each token within its row's response
    return mask & (rank % every == 0)


def flat_step_values(values_at: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """[B, T] per-token value of the state where the token's step starts."""
    step_of = (starts.long().cumsum(-1) - 1).clamp(min=0)
    first = torch.where(starts, torch.arange(starts.shape[1]), starts.shape[1] - 1)
    positions = first.sort(-1).values.gather(1, step_of)  # column of each step's first token
    return values_at.gather(1, positions)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_step_loss_is_zero_at_the_soft_optimum(every):
    """Exact V* at step starts + pi* = zero residual for any split into steps; a policy
    that is not pi* gets a positive loss."""
    tree = random_tree(vocab=3, depth=4, beta=0.5, seed=7)
    data = sample_dataset(tree, n=200, seed=7)
    pi_star, v_star = tree.soft_optimal()
    idx, act, mask = data["state_idx"], data["action"], data["mask"]
    starts = step_layout(mask, every)
    values = flat_step_values(v_star[idx], starts)
    cfg = AlgoConfig(beta=0.5)
    out = dqo_step_loss(torch.log(pi_star)[idx, act], data["ref_lp"], values, data["reward"],
                        mask, starts, cfg)
    assert out.loss.item() < 1e-20
    assert out.metrics["steps_per_row"].item() > 1
    off = dqo_step_loss(data["ref_lp"], data["ref_lp"], values, data["reward"], mask, starts, cfg)
    assert off.loss.item() > 1e-3


def test_step_loss_value_and_gradient_match_the_definition():
    gen = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    starts = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    v = torch.tensor([[0.3, 0.3, 0.9, 0.1, 0.1, 0.0], [0, 0, 0.6, 0.6, 0.6, 0.6]])
    rewards = torch.zeros(2, 6)
    rewards[0, 4], rewards[1, 5] = 1.0, 0.0
    rewards[0, 1] = 0.05  # a dense reward inside step 0 of row 0
    policy_lp = (-torch.rand(2, 6, generator=gen)).requires_grad_()
    ref_lp = -torch.rand(2, 6, generator=gen)
    cfg = AlgoConfig(beta=0.2, kl_coef=0.5)
    kl = torch.rand(2, 6, generator=gen)
    out = dqo_step_loss(policy_lp, ref_lp, v, rewards, mask, starts, cfg, full_kl=kl)
    ratio = (policy_lp - ref_lp).detach()
    eps = torch.stack([  # row 0: steps [0,1], [2], [3,4]; row 1: one step [2..5]
        0.2 * ratio[0, :2].sum() + 0.3 - (0.05 + 0.9),
        0.2 * ratio[0, 2] + 0.9 - 0.1,
        0.2 * ratio[0, 3:5].sum() + 0.1 - 1.0,
        0.2 * ratio[1, 2:].sum() + 0.6 - 0.0])
    kl_mean = kl[mask].mean()
    torch.testing.assert_close(out.loss.detach(), eps.square().mean() + 0.5 * kl_mean)
    (grad,) = torch.autograd.grad(out.loss, policy_lp)
    expected = torch.zeros(2, 6)
    for (row, cols), e in zip([(0, [0, 1]), (0, [2]), (0, [3, 4]), (1, [2, 3, 4, 5])], eps,
                              strict=True):
        expected[row, cols] = 2 * 0.2 * e / 4  # every token of step k moves with eps_k
    torch.testing.assert_close(grad, expected)
    assert out.value_loss is None and out.metrics["steps_per_row"].item() == 2.0
