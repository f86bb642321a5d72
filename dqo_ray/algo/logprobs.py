"""Per-token log-probabilities of chosen tokens, without a full log-softmax copy.

log p(a) = logit[a] - logsumexp(logits). Gathering one logit and reducing the row keeps only
an [N] result per chunk; `log_softmax(...).gather(...)` would allocate and (under autograd)
retain a second [N, V] tensor. Rows are processed in chunks so that the temporary `exp`
buffer inside logsumexp stays bounded for long sequences and large vocabularies.
"""

from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Log-probability of each chosen token under softmax(logits / temperature).

    Args:
        logits: [..., V] unnormalised scores (any float dtype; computed in float32).
        tokens: [...] int64 token ids, same leading shape as `logits`.
        temperature: > 0; the behaviour log-probs of tempered sampling use the same value.
        chunk_tokens: rows per chunk of the flattened [N, V] view.

    Returns:
        [...] float32 log-probs, differentiable w.r.t. `logits`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} "
                         "disagree on leading dims")
    flat_logits = logits.reshape(-1, logits.shape[-1])  # [N, V]
    flat_tokens = tokens.reshape(-1, 1)  # [N, 1]
    out = []
    for start in range(0, flat_logits.shape[0], chunk_tokens):
        chunk = flat_logits[start : start + chunk_tokens].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        chosen = chunk.gather(-1, flat_tokens[start : start + chunk_tokens]).squeeze(-1)
        out.append(chosen - torch.logsumexp(chunk, dim=-1))
    if not out:
        return logits.new_zeros(tokens.shape, dtype=torch.float32)
    return torch.cat(out).reshape(tokens.shape)
