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


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) over the whole vocabulary at each position: sum_v p (log p - log q).

    Args: logits [..., V] (with grad), ref_logits [..., V] (constant). Returns [...] float32.
    Unlike the sampled-token estimators, it also sees the mass a step moves to tokens that no
    trajectory sampled (OREO, arXiv 2412.16145, adds it to the policy loss for that reason).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy(logits: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """[..., V] -> [...] the entropy of softmax(logits) in nats (float32), computed in chunks
    of rows so a large vocabulary never needs a float32 copy of all logits at once."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for start in range(0, flat.shape[0], chunk_tokens):
        logp = torch.log_softmax(flat[start : start + chunk_tokens].float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    if not out:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(out).reshape(logits.shape[:-1])
