"""A policy's weights as one safetensors blob: what the trainer hands the generator engines
through the object store at a refresh (no disk), in the format their loaders read."""

from __future__ import annotations

import torch
from safetensors.torch import load as load_blob
from safetensors.torch import save as save_blob

__all__ = ["load_blob", "weights_blob"]


def weights_blob(state_dict: dict[str, torch.Tensor] | None,
                 dtype: torch.dtype | None = None) -> bytes:
    """safetensors bytes of `state_dict` (floating tensors in `dtype` when given). A tensor
    shared under two names (tied embeddings: lm_head.weight is embed_tokens.weight) is kept
    under its first name only, as an HF checkpoint keeps it."""
    if state_dict is None:
        raise ValueError("no state dict: only rank 0 holds the gathered weights")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.detach().cpu().contiguous()
    return save_blob(tensors)
