"""Policy and value model construction; the tiny model and tokenizer for tests and the demo."""

from dqo_ray.models.loading import (
    attn_implementation,
    load_policy,
    load_tokenizer,
    load_value,
    resolve_checkpoint,
    resolve_dtype,
)
from dqo_ray.models.tiny import build_word_tokenizer, save_tiny_checkpoint, tiny_llama
from dqo_ray.models.value import ValueModel, ValueModelConfig

__all__ = ["ValueModel", "ValueModelConfig", "attn_implementation", "build_word_tokenizer",
           "load_policy",
           "load_tokenizer", "load_value", "resolve_checkpoint", "resolve_dtype", "save_tiny_checkpoint", "tiny_llama"]
