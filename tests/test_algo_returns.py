"""lambda_returns against an independent O(H^2) closed form, and its edge cases."""

import pytest
import torch

from dqo_ray.algo import lambda_returns


def naive_returns(r, v, log_ratio, valid_len, boot, beta, lam, c=None):
    """One row, valid tokens 0..n-1. Closed form of the recursion:
    G_h - V_h = sum_{k>=h} lam^(k-h) * (prod_{j=h+1..k} c_j) * delta_k, Q_h = G_h + beta*l_h."""
    n = valid_len
    v_next = [v[h + 1] if h + 1 < n else boot for h in range(n)]
    delta = [r[h] - beta * log_ratio[h] + v_next[h] - v[h] for h in range(n)]
    g, q = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for h in range(n):
        total, weight = 0.0, 1.0
        for k in range(h, n):
            if k > h:
                weight *= lam * (1.0 if c is None else float(c[k]))
            total += weight * delta[k]
        g[h] = v[h] + total
        q[h] = g[h] + beta * log_ratio[h]
    return q, g


def random_batch(seed, batch=6, length=9):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    r = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    log_ratio = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    c = torch.rand(batch, length, generator=gen, dtype=torch.float64) * 1.5
    boot = torch.randn(batch, generator=gen, dtype=torch.float64)
    return lengths, r, v, log_ratio, c, boot


def place(rows, lengths, length, left):
    """Packs per-row [n] tensors into [B, T] with left or right padding (pad value 123)."""
    out = torch.full((len(rows), length), 123.0, dtype=torch.float64)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        sl = slice(length - n, length) if left else slice(0, n)
        out[i, sl], mask[i, sl] = row[:n], True
    return out, mask


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("use_trace", [False, True])
def test_matches_naive_reference(lam, left, use_trace):
    beta = 0.7
    for seed in range(5):
        lengths, r, v, log_ratio, c, boot = random_batch(seed)
        length = r.shape[1]
        ns = lengths.tolist()
        pr, mask = place(r, ns, length, left)
        pv, _ = place(v, ns, length, left)
        pl, _ = place(log_ratio, ns, length, left)
        pc, _ = place(c, ns, length, left)
        q, g = lambda_returns(pr, pv, pl, mask, boot, beta=beta, lam=lam,
                              trace=pc if use_trace else None)
        assert torch.all(q[~mask] == 0) and torch.all(g[~mask] == 0)
        for i, n in enumerate(ns):
            q_ref, g_ref = naive_returns(r[i], v[i], log_ratio[i], n, boot[i], beta, lam,
                                         c[i] if use_trace else None)
            torch.testing.assert_close(q[i][mask[i]].double(), q_ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(g[i][mask[i]].double(), g_ref, rtol=0, atol=1e-5)


def test_recursion_form_of_the_doc():
    """c == 1: Q_h = r_h + (1-lam) V_{h+1} + lam G_{h+1}, G_h = Q_h - beta l_h, G_H = V_H."""
    lengths, r, v, log_ratio, _, boot = random_batch(7, batch=1)
    beta, lam = 0.3, 0.6
    mask = torch.ones_like(r, dtype=torch.bool)
    q, g = lambda_returns(r, v, log_ratio, mask, boot, beta=beta, lam=lam)
    length = r.shape[1]
    v_ext = torch.cat([v[0], boot]).float()
    g_ext = torch.cat([g[0], boot.float()])
    for h in range(length):
        expect_q = r[0, h] + (1 - lam) * v_ext[h + 1] + lam * g_ext[h + 1]
        assert q[0, h].item() == pytest.approx(expect_q.item(), abs=1e-5)
        assert g[0, h].item() == pytest.approx((q[0, h] - beta * log_ratio[0, h]).item(), abs=1e-5)


def test_lambda_one_is_soft_monte_carlo_return():
    """lam = 1, V_H = 0: G_h = sum_{k>=h} (r_k - beta l_k), independent of V."""
    _, r, v, log_ratio, _, _ = random_batch(3, batch=2)
    mask = torch.ones_like(r, dtype=torch.bool)
    _, g = lambda_returns(r, v, log_ratio, mask, beta=0.2, lam=1.0)
    soft_reward = r - 0.2 * log_ratio
    expected = soft_reward.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(g.double(), expected, rtol=0, atol=1e-5)


def test_rejects_non_contiguous_mask():
    r = torch.zeros(2, 4)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    with pytest.raises(ValueError, match=r"mask rows \[1\] have non-contiguous"):
        lambda_returns(r, r, r, mask, beta=0.1, lam=1.0)
