"""Baseline losses on the same inputs as DQO (docs/algorithm.md section 7).

    RFT  cross-entropy on correct responses only.
    DPO  rows come in pairs (2i = chosen/correct, 2i+1 = rejected/incorrect, same prompt);
         -log sigmoid(beta * (sum l_chosen - sum l_rejected)).
    DRO  one value per prompt V(x) = V_phi(s_0); (beta*sum_h l_h + V(x) - R)^2 / 2, with the
         policy and the value each updated on their own part (the bandit special case of DQO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dqo_ray.algo.dqo import LossOutput, masked_mean


def sequence_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B] sum over valid tokens."""
    return (x * mask.to(x.dtype)).sum(-1)


def rft_loss(policy_logprobs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
             reduction: str = "token") -> LossOutput:
    """SFT on correct responses. policy_logprobs [B, T], mask [B, T] bool, correct [B] bool."""
    keep = mask & correct.bool()[:, None]  # [B, T]
    loss = -masked_mean(policy_logprobs, keep, reduction)
    metrics = {"loss": loss.detach(), "rft_rows": correct.bool().sum().float(),
               "nll": loss.detach()}
    return LossOutput(loss, metrics, policy_loss=loss)


def dpo_loss(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
             beta: float) -> LossOutput:
    """DPO sigmoid loss; rows interleaved (chosen, rejected). Inputs [2P, T], mask bool."""
    if policy_logprobs.shape[0] % 2:
        raise ValueError(f"dpo_loss needs an even number of rows (pairs), got "
                         f"{policy_logprobs.shape[0]}")
    seq_log_ratio = sequence_sum(policy_logprobs - ref_logprobs, mask)  # [2P]
    margin = beta * (seq_log_ratio[0::2] - seq_log_ratio[1::2])  # [P]
    loss = -F.logsigmoid(margin).mean()
    metrics = {"loss": loss.detach(), "dpo_margin": margin.detach().mean(),
               "dpo_accuracy": (margin.detach() > 0).float().mean()}
    return LossOutput(loss, metrics, policy_loss=loss)


def dro_loss(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
             prompt_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
             beta: float, value_coef: float = 1.0) -> LossOutput:
    """DRO. policy_logprobs/ref_logprobs [B, T]; prompt_values [B] V(x) with grad to phi;
    returns [B] total reward R of each response; mask [B, T] bool."""
    seq_log_ratio = sequence_sum(policy_logprobs - ref_logprobs, mask)  # [B], grad to theta
    policy_residual = beta * seq_log_ratio + prompt_values.detach() - returns
    value_residual = beta * seq_log_ratio.detach() + prompt_values - returns
    policy_loss = 0.5 * policy_residual.square().mean()
    value_loss = 0.5 * value_residual.square().mean()
    loss = policy_loss + value_coef * value_loss
    metrics = {"loss": loss.detach(), "policy_loss": policy_loss.detach(),
               "value_loss": value_loss.detach(), "value_mean": prompt_values.detach().mean()}
    return LossOutput(loss, metrics, policy_loss, value_coef * value_loss)
