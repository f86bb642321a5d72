"""Tiny model factory, local tokenizer and the value model (HF save/load, alignment)."""

import pytest
import torch
from transformers import AutoModel

from dqo_ray.config import ConfigError
from dqo_ray.models import (
    ValueModel,
    build_word_tokenizer,
    load_policy,
    load_tokenizer,
    load_value,
    resolve_checkpoint,
    tiny_llama,
)


def test_tokenizer_round_trips_and_marks_unknown_words():
    tok = build_word_tokenizer(["Tom", "has", "apples"])
    text = "Tom has 12 apples.\nTom has  0 apples?\nanswer: 9"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("Tom has 12")["input_ids"]) == ["Tom", " has", " 1", "2"]
    assert tok.convert_ids_to_tokens(tok("Tom eats")["input_ids"]) == ["Tom", "<unk>"]
    chat = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples."}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == "user: Tom has 3 apples.\nassistant:"
    for bad in ("two words", "3rd", ""):
        with pytest.raises(ValueError, match=f"entry {bad!r} must be ASCII letters only"):
            build_word_tokenizer([bad])


def test_tiny_llama_shape_and_parameter_count():
    h, layers, vocab = 128, 4, 60
    model = tiny_llama(vocab, hidden_size=h, layers=layers, heads=4)
    per_layer = 4 * h * h + 3 * h * (4 * h) + 2 * h  # attention + MLP + two RMSNorms
    expected = vocab * h + layers * per_layer + h  # tied embeddings + final norm
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.config.tie_word_embeddings
    assert tiny_llama(vocab, seed=1).state_dict().keys() == model.state_dict().keys()
    a, b = tiny_llama(vocab, seed=3), tiny_llama(vocab, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_checkpoint_loads_through_the_generic_loaders(tiny_checkpoint):
    policy = load_policy(tiny_checkpoint)
    tok = load_tokenizer(tiny_checkpoint)
    assert policy.config.eos_token_id == tok.eos_token_id
    assert policy.config.vocab_size == len(tok)


def test_value_model_from_policy_save_load_and_alignment(tiny_checkpoint, tmp_path):
    policy = load_policy(tiny_checkpoint)
    value = load_value(None, tiny_checkpoint)
    for name, p in value.backbone.state_dict().items():  # backbone = policy minus its LM head
        assert torch.equal(p, policy.model.state_dict()[name]), name
    ids = torch.randint(4, policy.config.vocab_size, (2, 9))
    assert torch.count_nonzero(value(ids)) == 0  # zero head: V = 0 before training

    torch.nn.init.normal_(value.value_head.weight)
    out = value(ids)
    assert out.shape == (2, 9) and out.dtype == torch.float32
    # V at position t is the value of the state "tokens 0..t": later tokens cannot change it.
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % policy.config.vocab_size
    torch.testing.assert_close(value(changed)[:, :5], out[:, :5])
    assert not torch.allclose(value(changed)[:, 5], out[:, 5])

    value.save_pretrained(tmp_path / "value")
    assert (tmp_path / "value" / "config.json").exists()
    for reloaded in (load_value(tmp_path / "value", tiny_checkpoint),
                     AutoModel.from_pretrained(tmp_path / "value")):
        assert isinstance(reloaded, ValueModel)
        torch.testing.assert_close(reloaded(ids), out)


def test_value_model_gradient_checkpointing_matches(tiny_checkpoint):
    value = load_value(None, tiny_checkpoint)
    torch.nn.init.normal_(value.value_head.weight)
    ids = torch.randint(4, 30, (2, 6))
    value.train()
    value(ids).sum().backward()
    plain = [p.grad.clone() for p in value.parameters()]
    value.zero_grad()
    value.gradient_checkpointing_enable()
    value(ids).sum().backward()
    for g, p in zip(plain, value.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


def test_resolve_checkpoint_is_absolute_and_names_the_key(tiny_checkpoint, tmp_path,
                                                          monkeypatch):
    # Relative to the driver's folder in, absolute out: Ray Train workers run elsewhere.
    monkeypatch.chdir(tiny_checkpoint.parent)
    resolved = resolve_checkpoint(tiny_checkpoint.name, tmp_path, "model.policy")
    assert resolved == str(tiny_checkpoint.absolute())
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(resolved, tmp_path, "model.policy") == resolved
    with pytest.raises(ConfigError, match=r"model.value: 'nope' -> nope is not an HF checkpoint"):
        resolve_checkpoint("nope", tmp_path, "model.value")
