"""The DQO losses (docs/algorithm.md sections 2-3), pure torch over padded [B, T] tensors.

    Q_theta(s_h, a_h) = beta*l_h + V_phi(s_h),   l_h = log pi_theta(a_h|s_h) - log pi_ref(a_h|s_h)
    eps_h = beta*l_h + V_h - Q^lam_h                                  (shared residual)
    L_pi  = mean_h w_h * (beta*l_h + sg(V_h) - sg(Q^lam_h))^2         (grad to theta only)
    L_V   = mean_h w_h * (V_h - sg(G_h))^2                            (grad to phi only)
    loss  = L_pi + alpha * mean_h KL(pi_theta(.|s_h) || pi_ref(.|s_h)) + c_V * L_V
(alpha = algo.kl_coef, 0 by default: the optional full-vocabulary term of OREO.)
Q^lam, G come from `lambda_returns` on detached l and V. Off-policy options (`algo.off_policy`):
    none       w_h = 1, c = 1
    truncated  w_h = 1, c_h = min(c_max, rho_h) in the return recursion   [default]
    sequence   w_h = min(w_max, prod_h rho_h) per trajectory, c = 1
with rho_h = exp(log pi_theta - log mu)(a_h|s_h), detached; mu = behaviour policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dqo_ray.algo.returns import lambda_returns
from dqo_ray.config import AlgoConfig


@dataclass
class LossOutput:
    """loss = policy_loss + value_coef * value_loss. The two parts reach disjoint parameters
    (policy / value model), so each training engine can backpropagate its own part."""

    loss: torch.Tensor  # [] the scalar to backpropagate
    metrics: dict[str, torch.Tensor]  # name -> [] detached scalars
    policy_loss: torch.Tensor  # [] with grad to the policy only
    value_loss: torch.Tensor | None = None  # [] c_V * L_V, grad to the value model only
    policy_terms: torch.Tensor | None = None  # [B, T] w_h * eps_h^2 (0 on padding)
    value_terms: torch.Tensor | None = None  # [B, T] w_h * (V_h - G_h)^2 (0 on padding)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Mean of x [B, T] over mask: over all valid tokens ("token") or of row means ("sequence")."""
    mask = mask.to(x.dtype)
    if reduction == "token":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    counts = mask.sum(-1)
    rows = counts > 0
    row_means = (x * mask).sum(-1)[rows] / counts[rows]
    return row_means.mean() if row_means.numel() else x.sum() * 0


def explained_variance(prediction: torch.Tensor, target: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - prediction) / Var(target) over the valid tokens of [B, T] tensors.

    1 = the value predicts its target exactly, 0 = no better than the batch mean, < 0 = worse.
    A DQO run whose value model stays near 0 here pushes every token of a trajectory by
    (R - constant), a high-variance policy gradient, so this is the first number to read.
    """
    def variance(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask)).square(), mask)

    return 1 - variance(target - prediction) / variance(target).clamp(min=1e-8)


def dqo_loss(
    policy_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgoConfig,
    bootstrap_value: torch.Tensor | None = None,
    full_kl: torch.Tensor | None = None,
) -> LossOutput:
    """DQO policy + value loss for a batch of trajectories.

    Args:
        policy_logprobs:    [B, T] log pi_theta(a_h|s_h), with grad to the policy.
        ref_logprobs:       [B, T] log pi_ref(a_h|s_h) (precomputed, constant).
        behaviour_logprobs: [B, T] log mu(a_h|s_h) recorded at sampling time (constant).
        values:             [B, T] V_phi(s_h), with grad to the value model.
        rewards:            [B, T] r_h.
        mask:               [B, T] bool, True on response tokens (contiguous per row).
        cfg:                beta, lam, value_coef, off_policy, trace_clip,
                            sequence_weight_clip, reduction.
        bootstrap_value:    [B] V_H after the last token; None = 0 (EOS is terminal).
        full_kl:            [B, T] KL(pi_theta(.|s_h) || pi_ref(.|s_h)) over the vocabulary,
                            with grad to the policy; adds cfg.kl_coef * its mean to L_pi.

    Returns:
        LossOutput with loss = L_pi + value_coef * L_V, per-token terms and metrics.
    """
    maskf = mask.float()
    log_ratio = policy_logprobs - ref_logprobs  # [B, T] l_h, grad to theta
    log_ratio_sg, values_sg = log_ratio.detach(), values.detach()
    log_rho = (policy_logprobs.detach() - behaviour_logprobs) * maskf  # [B, T] log pi/mu

    trace, weights = None, torch.ones_like(maskf)  # [B, T]
    metrics: dict[str, torch.Tensor] = {}
    if cfg.off_policy == "truncated":
        rho = log_rho.exp()
        trace = rho.clamp(max=cfg.trace_clip)
        metrics["trace_clip_frac"] = masked_mean((rho > cfg.trace_clip).float(), mask)
    elif cfg.off_policy == "sequence":
        log_w = log_rho.sum(-1).clamp(max=math.log(cfg.sequence_weight_clip))  # [B]
        seq_w = log_w.exp()
        weights = seq_w[:, None].expand_as(maskf)
        metrics["seq_weight_mean"] = seq_w.mean()
        metrics["seq_weight_ess_frac"] = seq_w.sum() ** 2 / (seq_w.square().sum() * len(seq_w))

    boot = None if bootstrap_value is None else bootstrap_value.detach()
    q_target, v_target = lambda_returns(rewards, values_sg, log_ratio_sg, mask, boot,
                                        beta=cfg.beta, lam=cfg.lam, trace=trace)

    policy_residual = cfg.beta * log_ratio + values_sg - q_target  # [B, T] eps_h, grad to theta
    value_residual = values - v_target  # [B, T], grad to phi
    policy_terms = weights * policy_residual.square() * maskf
    value_terms = weights * value_residual.square() * maskf
    policy_loss = masked_mean(policy_terms, mask, cfg.reduction)
    value_loss = masked_mean(value_terms, mask, cfg.reduction)
    if full_kl is not None:
        kl_mean = masked_mean(full_kl, mask, cfg.reduction)
        metrics["kl_full"] = kl_mean.detach()
        policy_loss = policy_loss + cfg.kl_coef * kl_mean
    loss = policy_loss + cfg.value_coef * value_loss

    with torch.no_grad():
        metrics.update(
            loss=loss.detach(),
            policy_loss=policy_loss.detach(),
            value_loss=value_loss.detach(),
            residual_abs=masked_mean(policy_residual.detach().abs(), mask),
            value_mean=masked_mean(values_sg, mask),
            value_explained_var=explained_variance(values_sg, v_target, mask),
            q_target_mean=masked_mean(q_target, mask),
            # KL(pi_theta || pi_ref) estimators on the data's tokens (exact in expectation only
            # when the data are on-policy): k1 = l, k3 = exp(-l) - 1 + l >= 0.
            kl_k1=masked_mean(log_ratio_sg, mask),
            kl_k3=masked_mean(torch.expm1(-log_ratio_sg) + log_ratio_sg, mask),
            is_ratio_mean=masked_mean(log_rho.exp(), mask),
            is_ratio_max=(log_rho.exp() * maskf).max(),
        )
    return LossOutput(loss, metrics, policy_loss, cfg.value_coef * value_loss,
                      policy_terms.detach(), value_terms.detach())


def dqo_step_loss(
    policy_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    step_values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    step_starts: torch.Tensor,
    cfg: AlgoConfig,
    full_kl: torch.Tensor | None = None,
) -> LossOutput:
    """DQO's consistency between reasoning-step boundaries, where Monte-Carlo rollouts give V
    (algo.step_values = mc). For step k of a response, from state s_k to s_{k+1}:

        L_k   = sum_{h in step k} l_h                       (grad to theta, every token)
        eps_k = beta*L_k + V(s_k) - (r_k + V(s_{k+1}))      (V(s_K) = 0 after the last step)
        L_pi  = mean_k eps_k^2  [+ alpha * mean_h full KL, as in dqo_loss]

    Summing the token-level relation beta*l_h = r_h + V*(s_{h+1}) - V*(s_h) over a step gives
    eps_k = 0 at the soft optimum, so this keeps DQO's fixed point while needing V only at
    step starts. It is the one-step (lambda = 0) target over steps, so it needs no importance
    correction: the relation holds for every visited step, whoever sampled it.

    Args:
        policy_logprobs, ref_logprobs, rewards, mask: [B, T] as in `dqo_loss`.
        step_values: [B, T] V(s_k) of the step each token belongs to (constants).
        step_starts: [B, T] bool, True at the first token of each step (inside `mask`).
    """
    maskf = mask.to(policy_logprobs.dtype)
    starts = step_starts & mask
    step_of = (starts.long().cumsum(-1) - 1).clamp(min=0)  # [B, T] step index of each token
    n_steps = int(starts.sum(-1).max().item()) if starts.any() else 1

    def per_step(x: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, K] sums over each step
        return x.new_zeros(x.shape[0], n_steps).scatter_add(1, step_of, x * maskf)

    valid = per_step(starts.to(maskf.dtype)) > 0  # [B, K] steps that exist
    step_ratio = per_step(policy_logprobs - ref_logprobs)  # [B, K] L_k, grad to theta
    v_start = per_step(step_values.detach() * starts)  # [B, K] V(s_k)
    v_next = torch.cat([v_start[:, 1:], v_start.new_zeros(len(v_start), 1)], dim=1)
    v_next = v_next * torch.cat([valid[:, 1:], valid.new_zeros(len(valid), 1)], dim=1)
    target = per_step(rewards) + v_next  # [B, K] r_k + V(s_{k+1})
    residual = cfg.beta * step_ratio + v_start - target  # [B, K] eps_k
    policy_loss = masked_mean(residual.square(), valid, cfg.reduction)
    metrics: dict[str, torch.Tensor] = {}
    if full_kl is not None:
        kl_mean = masked_mean(full_kl, mask, cfg.reduction)
        metrics["kl_full"] = kl_mean.detach()
        policy_loss = policy_loss + cfg.kl_coef * kl_mean
    with torch.no_grad():
        log_ratio = (policy_logprobs - ref_logprobs).detach()
        metrics.update(
            loss=policy_loss.detach(), policy_loss=policy_loss.detach(),
            residual_abs=masked_mean(residual.detach().abs(), valid),
            value_mean=masked_mean(v_start, valid),
            step_target_mean=masked_mean(target - v_start, valid),  # mean change of value
            steps_per_row=valid.float().sum(-1).mean(),
            kl_k1=masked_mean(log_ratio, mask),
            kl_k3=masked_mean(torch.expm1(-log_ratio) + log_ratio, mask),
        )
    return LossOutput(policy_loss, metrics, policy_loss)
