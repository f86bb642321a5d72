"""docs/algorithm.md section 4: DQO's losses have the soft-optimal policy/value as fixed point.

Tabular pi_theta (one logit row per state) and V_phi (one scalar per state) are trained with
`dqo_loss` on trajectories sampled from a behaviour policy mu != pi_ref, and must converge to
pi* and V* from exact soft value iteration, to 1e-3, for every lambda and off-policy option.
Every seed in range(3) must pass; each tree is 15 states deep-4 with EOS (variable lengths,
left- and right-padded rows). Measured errors when written: ~1e-7 (the bar is 1e-3).
This test catches wrong signs and an off-by-one in V_{h+1}; a missing stop-gradient leaves
the fixed point unchanged, so test_algo_losses.py checks gradient routing separately.
"""

import pytest
import torch
from tabular import random_tree, sample_dataset

from dqo_ray.algo import dqo_loss
from dqo_ray.config import AlgoConfig

BETA = 0.5


def train_tabular(lam: float, off_policy: str, seed: int, iters: int = 600, lr: float = 0.05):
    tree = random_tree(vocab=3, depth=4, beta=BETA, seed=seed)
    data = sample_dataset(tree, n=4000, seed=seed)
    visited = set(zip(data["state_idx"][data["mask"]].tolist(),
                      data["action"][data["mask"]].tolist(), strict=True))
    assert len(visited) == len(tree.states) * tree.vocab, "data must cover every (s, a)"

    logits = tree.log_ref.clone().requires_grad_(True)  # pi_theta starts at pi_ref
    values = torch.zeros(len(tree.states), dtype=torch.float64, requires_grad=True)
    cfg = AlgoConfig(beta=BETA, lam=lam, off_policy=off_policy)
    opt = torch.optim.Adam([logits, values], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=lr * 0.01)
    idx, act = data["state_idx"], data["action"]
    for _ in range(iters):
        policy_lp = torch.log_softmax(logits, -1)[idx, act]  # [N, T]
        out = dqo_loss(policy_lp, data["ref_lp"], data["behaviour_lp"], values[idx],
                       data["reward"], data["mask"], cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    pi_star, v_star = tree.soft_optimal()
    return tree, (torch.softmax(logits, -1) - pi_star).abs().max().item(), \
        (values - v_star).abs().max().item()


@pytest.mark.parametrize("off_policy", ["none", "truncated", "sequence"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_converges_to_soft_optimum(lam, off_policy):
    torch.set_num_threads(1)
    for seed in range(3):
        tree, pi_err, v_err = train_tabular(lam, off_policy, seed)
        assert pi_err <= 1e-3, f"seed {seed}: max |pi - pi*| = {pi_err:.2e}"
        assert v_err <= 1e-3, f"seed {seed}: max |V - V*| = {v_err:.2e}"


def test_behaviour_policy_differs_from_reference():
    tree = random_tree(vocab=3, depth=4, beta=BETA, seed=0)
    gap = (tree.log_behaviour.exp() - tree.log_ref.exp()).abs().max().item()
    assert gap > 0.2
    # and the optimum is non-trivial: pi* moves away from pi_ref
    pi_star, _ = tree.soft_optimal()
    assert (pi_star - tree.log_ref.exp()).abs().max().item() > 0.05
