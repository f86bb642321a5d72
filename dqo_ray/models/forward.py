"""Forward passes over padded batches that training and the reference stage share (pure
torch): positions that ignore left padding, next-token scores, token log-probs, values.

Index t of a [B, L-1] result scores token t+1 from the state ending at position t.
"""

from __future__ import annotations

import torch
from torch import nn

from dqo_ray.algo.logprobs import token_logprobs


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def next_token_logits(model: nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] ids -> [B, L-1, V] scores of token t+1 given tokens <= t."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask)).logits[:, :-1]


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, L] ids -> [B, L-1] log p(token t+1 | tokens <= t) (0-padded where masked)."""
    logits = next_token_logits(model, input_ids, attention_mask)  # [B, L-1, V]
    return token_logprobs(logits, input_ids[:, 1:], temperature=temperature)


def sequence_values(value_model: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] ids -> [B, L] V(state ending at each position)."""
    return value_model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids(attention_mask))
