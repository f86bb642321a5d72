"""Monte-Carlo process rewards (docs/algorithm.md section 5), pure logic.

A response is split into reasoning steps at a delimiter (default: newline). For the prefix
ending after step k, m completions from the current policy estimate p_k = P(correct | prefix);
p_0 comes from the prompt alone and p_K is the graded outcome. Step k's last token gets the
shaped reward alpha * (p_k - p_{k-1}). The shaping is potential-based (it telescopes to
alpha * (p_K - p_0) per trajectory), so it densifies credit without changing which complete
response is best.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def step_ends(token_texts: Sequence[str], delimiter: str = "\n") -> list[int]:
    """Indices of the tokens that end each step: every token whose text contains the delimiter,
    and the last token (which ends the final step). [] for an empty response."""
    if not token_texts:
        return []
    ends = [i for i, text in enumerate(token_texts) if delimiter in text]
    if not ends or ends[-1] != len(token_texts) - 1:
        ends.append(len(token_texts) - 1)
    return ends


def shaped_step_rewards(step_values: Sequence[float], alpha: float) -> list[float]:
    """[p_0, p_1, ..., p_K] -> K rewards alpha * (p_k - p_{k-1}), k = 1..K."""
    return [alpha * (after - before) for before, after in zip(step_values, step_values[1:],
                                                             strict=False)]


def soft_step_values(success: torch.Tensor, beta: float, reward_correct: float = 1.0,
                     reward_incorrect: float = 0.0) -> torch.Tensor:
    """Success rates p -> soft values beta * log((1-p) e^(r_incorrect/beta) + p e^(r_correct/beta)).

    V*(s) = beta * log E_ref[exp(R / beta)] is DQO's optimal soft value when the rollouts that
    measured p sampled from pi_ref (an approximation once they sample from a newer policy).
    Computed in log space: e^(1/beta) overflows float32 for beta < 0.012.
    """
    p = success.double()
    log_terms = torch.stack([torch.log1p(-p) + reward_incorrect / beta,
                             torch.log(p) + reward_correct / beta])
    return (beta * torch.logsumexp(log_terms, dim=0)).to(success.dtype)
