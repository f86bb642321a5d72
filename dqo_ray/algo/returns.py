"""Soft lambda-returns for DQO (docs/algorithm.md section 3.1), with Retrace-style trace cutting.

Notation per response token h = 0..H-1 of one trajectory:
    r_h  reward,  V_h = V_phi(s_h),  l_h = log pi_theta(a_h|s_h) - log pi_ref(a_h|s_h),
    V_H  value after the last token (0 when the response ended with EOS).
Backward recursion from A_H = 0, with A_h = G_h - V_h:
    delta_h = r_h - beta*l_h + V_{h+1} - V_h                      (soft TD error)
    A_h     = delta_h + lam * c_{h+1} * A_{h+1}
    G_h     = V_h + A_h               (target for V at s_h)
    Q^lam_h = G_h + beta*l_h          (target for Q at (s_h, a_h))
With c == 1 this is exactly Q^lam_h = r_h + (1-lam)*V_{h+1} + lam*G_{h+1}, G_h = Q^lam_h - beta*l_h.
"""

from __future__ import annotations

import torch


def check_contiguous(mask: torch.Tensor) -> None:
    """Raises unless each row's valid tokens form one contiguous block (left or right padding)."""
    m = mask.to(torch.int8)
    starts = m[:, :1].sum(-1) + (m[:, 1:] > m[:, :-1]).sum(-1)  # [B] rising edges
    bad = (starts > 1).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"mask rows {bad.tolist()[:8]} have non-contiguous valid tokens; "
                         "responses must be one block with padding only on the left or right")


def reverse_linear_scan(x: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """y_t = x_t + decay_t * y_{t+1} along the last dim (y past the end = 0), by doubling:
    after the step of stride s, y_t sums x over [t, t + 2s) and decay_t is the product of
    decays over that window. log2(T) rounds of whole-tensor ops instead of a T-long Python
    loop (~8000 kernel launches per micro-batch of 1000-token responses on a GPU)."""
    y, decay = x.clone(), decay.clone()
    stride = 1
    while stride < x.shape[-1]:
        y[..., :-stride] = y[..., :-stride] + decay[..., :-stride] * y[..., stride:]
        decay[..., :-stride] = decay[..., :-stride] * decay[..., stride:]
        stride *= 2
    return y


def lambda_returns(
    rewards: torch.Tensor,
    values: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    bootstrap_value: torch.Tensor | None = None,
    *,
    beta: float,
    lam: float,
    trace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Computes Q^lam and G (value targets) for padded batches of response tokens.

    Args:
        rewards:   [B, T] r_h per response token (outcome reward on the last token).
        values:    [B, T] V_phi(s_h); treated as constants (pass detached tensors).
        log_ratio: [B, T] l_h = log pi_theta - log pi_ref of the taken token; constants.
        mask:      [B, T] bool, True on response tokens. Each row's tokens must be contiguous;
                   padding may sit on either side.
        bootstrap_value: [B] V_H after each row's last token; None = 0 (terminal at EOS).
        beta: KL coefficient.  lam: lambda in [0, 1].
        trace: [B, T] c_h = min(c_max, pi_theta/mu)(a_h|s_h) for the `truncated` off-policy
               correction; None means c == 1 (no cutting).

    Returns:
        (q_target, v_target), each [B, T] in the inputs' precision (at least float32), zero on
        padding.
    """
    check_contiguous(mask)
    batch = rewards.shape[0]
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype),
                                torch.promote_types(log_ratio.dtype, torch.float32))
    rewards, values, log_ratio = rewards.to(dtype), values.to(dtype), log_ratio.to(dtype)
    if bootstrap_value is None:
        bootstrap_value = rewards.new_zeros(batch)
    bootstrap_value = bootstrap_value.to(dtype)
    # A_h = delta_h + g_h * A_{h+1}, with g_h = lam * c_{h+1} inside a row's response and 0
    # at its last token (bootstrap_value is then V_{h+1}).
    has_next = torch.zeros_like(mask)
    has_next[:, :-1] = mask[:, 1:]
    v_next = torch.where(has_next, values.roll(-1, dims=1), bootstrap_value[:, None])
    delta = (rewards - beta * log_ratio + v_next - values) * mask  # [B, T]
    c_next = torch.ones_like(values)
    if trace is not None:
        c_next[:, :-1] = trace[:, 1:].to(dtype)
    decay = torch.where(has_next, lam * c_next, torch.zeros_like(values))  # [B, T]
    adv = reverse_linear_scan(delta, decay) * mask  # [B, T] A_h = G_h - V_h
    v_target = (values + adv) * mask
    q_target = (v_target + beta * log_ratio) * mask
    return q_target, v_target
