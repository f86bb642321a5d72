"""A tiny Llama-architecture model and a word-level tokenizer built locally (no hub access).

The tokenizer splits text into words, single digits and single punctuation marks, with a
leading space kept inside the token (" apples", " 3"), GPT-2 style, so decoding is plain
concatenation and round-trips exactly. Sequences stay short (a digit-level arithmetic
example is ~40-90 tokens), which is what lets a ~1M-parameter model learn multi-step tasks
on a CPU. Words outside the vocabulary become <unk>.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# A word, a digit, or a punctuation mark, each with its optional leading space; then lone
# whitespace characters (newline, or a space not followed by a token).
_SPLIT = r" ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]|\n| "
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
BASE_WORDS = ("system", "user", "assistant", "answer", "the", "is", "so", "step")


def build_word_tokenizer(words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word/digit-level tokenizer over BASE_WORDS + `words`, digits and ASCII punctuation."""
    pieces = list(dict.fromkeys([*BASE_WORDS, *words, *string.digits, *string.punctuation]))
    for piece in pieces:
        # The pre-tokenizer only ever emits letter runs or single characters.
        if not (piece.isascii() and (piece.isalpha() or (len(piece) == 1 and not piece.isspace()))):
            raise ValueError(f"vocabulary entry {piece!r} must be ASCII letters only, or one "
                             "digit or punctuation character")
    vocab: dict[str, int] = {}
    for token in [PAD, UNK, BOS, EOS, "\n", " "] + [p for w in pieces for p in (w, " " + w)]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        clean_up_tokenization_spaces=False, model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, hidden_size: int = 128, layers: int = 4, heads: int = 4,
               max_positions: int = 512, seed: int = 0,
               tokenizer: PreTrainedTokenizerFast | None = None) -> LlamaForCausalLM:
    """A small Llama (tied embeddings, MLP 4x hidden): ~1.06M params at the defaults."""
    special = {}
    if tokenizer is not None:
        special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, **special,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def save_tiny_checkpoint(path: str | os.PathLike, words: Iterable[str] = (), *,
                         hidden_size: int = 128, layers: int = 4, heads: int = 4,
                         seed: int = 0) -> Path:
    """Writes a tiny randomly initialised policy + its tokenizer as an HF checkpoint folder."""
    path = Path(path)
    tokenizer = build_word_tokenizer(words)
    model = tiny_llama(len(tokenizer), hidden_size, layers, heads, seed=seed, tokenizer=tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
