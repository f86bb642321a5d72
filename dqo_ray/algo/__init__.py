"""DQO and baseline losses: pure torch over padded tensors and masks. No Ray here."""

from dqo_ray.algo.baselines import dpo_loss, dro_loss, rft_loss, sequence_sum
from dqo_ray.algo.dqo import LossOutput, dqo_loss, dqo_step_loss, masked_mean
from dqo_ray.algo.logprobs import entropy, full_kl, token_logprobs
from dqo_ray.algo.returns import lambda_returns

__all__ = ["LossOutput", "dpo_loss", "dqo_loss", "dqo_step_loss", "dro_loss", "entropy", "full_kl",
           "lambda_returns", "masked_mean", "rft_loss", "sequence_sum", "token_logprobs"]
