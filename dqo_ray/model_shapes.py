"""Model sizes for the plan: a causal LM's shape (parameters, KV bytes per token) from its
config.json, the tiny model's settings, or a table of known hub models. Pure: no Ray, no torch."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dqo_ray.config import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int
    head_dim: int | None = None
    qkv_bias: bool = False
    source: str = ""

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def params(self) -> int:
        """Parameters of the causal LM (gated MLP, GQA attention, RMSNorm)."""
        return self.backbone_params + (0 if self.tied else self.vocab * self.hidden)

    @property
    def backbone_params(self) -> int:
        """Without an untied LM head: the value model's backbone."""
        q, kv = self.heads * self.head_size, self.kv_heads * self.head_size
        attention = self.hidden * (q + 2 * kv) + q * self.hidden
        if self.qkv_bias:
            attention += q + 2 * kv
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.vocab * self.hidden + self.layers * layer + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * dtype_bytes


def _shape(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, max_positions,
           qkv_bias=False) -> ModelShape:
    return ModelShape(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied,
                      max_positions, None, qkv_bias, "the table of known models")


# Hub models by name (their config.json values), for planning on a machine without the folder.
# Instruct and base checkpoints share a shape; the key is the name without "-Instruct".
KNOWN_MODELS: dict[str, ModelShape] = {s.name.lower(): s for s in (
    _shape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True, 32768, qkv_bias=True),
    _shape("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True, 32768, qkv_bias=True),
    _shape("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True, 32768, qkv_bias=True),
    _shape("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, 32768, qkv_bias=True),
    _shape("Qwen2.5-Math-1.5B", 1536, 28, 12, 2, 8960, 151936, True, 4096, qkv_bias=True),
    _shape("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True, 131072),
    _shape("Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True, 131072),
    _shape("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True, 8192),
    _shape("SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, True, 8192),
    _shape("SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 49152, True, 8192),
)}


def shape_from_hf_config(config: Mapping[str, Any], name: str, source: str) -> ModelShape:
    """A causal LM's HF config.json (a multimodal one's text_config) -> ModelShape."""
    c = dict(config.get("text_config") or config)
    hidden = int(c["hidden_size"])
    heads = int(c["num_attention_heads"])
    return ModelShape(
        name=name, hidden=hidden, layers=int(c["num_hidden_layers"]), heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads),
        intermediate=int(c.get("intermediate_size") or 4 * hidden),
        vocab=int(c["vocab_size"]),
        # Untied when the file does not say: an LM head counted twice errs on the safe side.
        tied=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        max_positions=int(c.get("max_position_embeddings") or 4096),
        head_dim=int(c["head_dim"]) if c.get("head_dim") else None,
        qkv_bias=bool(c.get("attention_bias") or c.get("model_type") in ("qwen2",)),
        source=source)


def model_shape(model: ModelConfig) -> ModelShape | None:
    """model.policy's shape: the tiny model's settings, the folder's config.json when this
    machine has it, else the table of known models by the folder's or hub name's last part.
    None when none of them knows it."""
    if model.policy == "tiny":
        # Its word-level vocabulary is built from the task's words at run time: ~1k.
        return ModelShape("tiny", model.tiny_hidden_size, model.tiny_layers, model.tiny_heads,
                          model.tiny_heads, 4 * model.tiny_hidden_size, 1024, True, 512,
                          source="model.tiny_* settings")
    config = Path(model.policy) / "config.json"
    if config.is_file():
        return shape_from_hf_config(json.loads(config.read_text()), Path(model.policy).name,
                                    str(config))
    key = re.sub(r"-instruct$", "", model.policy.rstrip("/").rsplit("/", 1)[-1].lower())
    return KNOWN_MODELS.get(key)
