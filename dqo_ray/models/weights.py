"""A policy's weights as the trainer hands them to the generator engines at a refresh (no disk):
one safetensors blob through the object store, or the same tensors over a collective
(`dqo_ray.models.weight_broadcast`), in the names and dtype their loaders read."""

from __future__ import annotations

import torch
from safetensors.torch import load as load_blob
from safetensors.torch import save as save_blob

__all__ = ["export_tensors", "load_blob", "weights_blob"]


def export_tensors(state_dict: dict[str, torch.Tensor] | None, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", copy: bool = True
                   ) -> dict[str, torch.Tensor]:
    """`state_dict`'s tensors on `device` (floating ones in `dtype` when given); with `copy`,
    none shares memory with the trainer's, so the next steps do not change them. A tensor shared under two names (tied embeddings: lm_head.weight
    is embed_tokens.weight) is kept under its first name only, as an HF checkpoint keeps it."""
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
        out = tensor.detach().to(device).contiguous()
        tensors[name] = out.clone() if copy and out.data_ptr() == tensor.data_ptr() else out
    return tensors


def weights_blob(state_dict: dict[str, torch.Tensor] | None,
                 dtype: torch.dtype | None = None) -> bytes:
    """safetensors bytes of `export_tensors(state_dict, dtype)` (the bytes are the copy)."""
    return save_blob(export_tensors(state_dict, dtype, copy=False))
