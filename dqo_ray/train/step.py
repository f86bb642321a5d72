"""The training step as plain functions: no Ray, no DeepSpeed, so it can be timed anywhere.

`loss_on_batch` runs the policy (and value model) over a padded batch from
`dqo_ray.data.batch.pad_trajectories` and returns the loss chosen by `algo.name`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dqo_ray.algo import (
    LossOutput,
    dpo_loss,
    dqo_loss,
    dqo_step_loss,
    dro_loss,
    entropy,
    full_kl,
    rft_loss,
    token_logprobs,
)
from dqo_ray.algo.process_rewards import soft_step_values
from dqo_ray.config import AlgoConfig
from dqo_ray.models.forward import next_token_logits, sequence_values


def loss_on_batch(policy: nn.Module, value_model: nn.Module | None,
                  batch: dict[str, torch.Tensor], cfg: AlgoConfig,
                  reference: nn.Module | None = None, train_policy: bool = True) -> LossOutput:
    """Forward passes + the configured loss. All [B, L-1] tensors are in "target" space:
    index t scores token t+1, read from the state ending at position t. `reference` (pi_ref,
    frozen) is needed only by dqo with algo.kl_coef > 0. Adds the policy's mean next-token
    `entropy` over response tokens to the metrics (rising entropy = mass leaving the data).
    train_policy=False (the value warm-up): the value loss reads the policy only as constants,
    so its forward runs without gradients, and neither pi_ref nor the full-vocabulary KL runs
    (both reach only the policy's loss, which then leaves out the KL term)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["response_mask"][:, 1:]  # [B, L-1] positions whose target is a response token
    with torch.set_grad_enabled(train_policy and torch.is_grad_enabled()):
        logits = next_token_logits(policy, ids, attn)  # [B, L-1, V]
    if not train_policy:
        cfg, reference = dataclasses.replace(cfg, kl_coef=0.0), None
    out = _configured_loss(logits, value_model, batch, mask, cfg, reference)
    with torch.no_grad():  # response positions only: [N, V], N = response tokens
        out.metrics["entropy"] = entropy(logits.detach()[mask.bool()]).mean()
    return out


def _configured_loss(logits: torch.Tensor, value_model: nn.Module | None,
                     batch: dict[str, torch.Tensor], mask: torch.Tensor, cfg: AlgoConfig,
                     reference: nn.Module | None) -> LossOutput:
    ids, attn = batch["input_ids"], batch["attention_mask"]
    policy_lp = token_logprobs(logits, ids[:, 1:]) * mask  # [B, L-1]
    if cfg.name == "rft":
        return rft_loss(policy_lp, mask, batch["correct"], cfg.reduction)
    ref_lp = batch["ref_logprobs"][:, 1:]
    if cfg.name == "dpo":
        return dpo_loss(policy_lp, ref_lp, mask, cfg.dpo_beta)
    if cfg.name == "dqo" and cfg.step_values == "mc":
        return _dqo_loss(logits, policy_lp, batch, mask, cfg, reference, None)
    if value_model is None:
        raise ValueError(f"algo.name={cfg.name!r} needs a value model")
    values_full = sequence_values(value_model, ids, attn)  # [B, L]
    if cfg.name == "dqo":
        return _dqo_loss(logits, policy_lp, batch, mask, cfg, reference, values_full)
    values = values_full[:, :-1] * mask  # V(s_h) at the position before each a_h
    if cfg.name == "dro":
        first = mask.float().argmax(-1)  # index of a_0 in target space -> V(s_0) = V(x)
        prompt_values = values.gather(1, first[:, None]).squeeze(1)
        return dro_loss(policy_lp, ref_lp, prompt_values, batch["returns"], mask, cfg.beta,
                        cfg.value_coef)
    raise ValueError(f"unknown algo.name {cfg.name!r}")


def _dqo_loss(logits: torch.Tensor, policy_lp: torch.Tensor, batch: dict[str, torch.Tensor],
              mask: torch.Tensor, cfg: AlgoConfig, reference: nn.Module | None,
              values_full: torch.Tensor | None) -> LossOutput:
    """dqo with V from the value model (`values_full` [B, L]) or, when None, from the
    Monte-Carlo step values in the batch (algo.step_values = mc)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    ref_lp = batch["ref_logprobs"][:, 1:]
    rewards = batch["rewards"][:, 1:]
    truncated = batch["truncated"]
    if cfg.truncated_response == "zero":
        # A response cut at the length limit earns nothing and ends there (V_H = 0).
        rewards = rewards * (~truncated)[:, None]
    kl = None
    if cfg.kl_coef > 0:
        if reference is None:
            raise ValueError("algo.kl_coef > 0 needs the reference model in the step")
        with torch.no_grad():
            ref_logits = next_token_logits(reference, ids, attn)
        response = mask.bool()
        kl = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)  # [B, L-1]
        kl[response] = full_kl(logits[response], ref_logits[response])  # [N], grad to theta

    if values_full is None:
        if "step_values" not in batch:
            raise ValueError("algo.step_values='mc' needs step_values in every trajectory "
                             "(generate with generation.process_reward_samples > 0)")
        values = soft_step_values(batch["step_values"][:, 1:], cfg.beta, cfg.reward_correct,
                                  cfg.reward_incorrect)  # [B, L-1]
        return dqo_step_loss(policy_lp, ref_lp, values, rewards, mask.bool(),
                             batch["step_starts"][:, 1:], cfg, full_kl=kl)
    values = values_full[:, :-1] * mask  # V(s_h) at the position before each a_h
    bootstrap = None
    if cfg.truncated_response == "bootstrap":
        last = batch["response_mask"].long().cumsum(-1).argmax(-1)  # position of a_{H-1}
        v_after = values_full.gather(1, last[:, None]).squeeze(1)  # V(s_H)
        bootstrap = torch.where(truncated, v_after, torch.zeros_like(v_after))
    return dqo_loss(policy_lp, ref_lp, batch["behaviour_logprobs"][:, 1:], values, rewards,
                    mask, cfg, bootstrap_value=bootstrap, full_kl=kl)
