"""Generation engines (actors/engines): real vLLM on CPU and real HF `generate`, checked against
an HF forward pass of the same checkpoint.

The behaviour log-probs must be those of the distribution actually sampled from
(docs/algorithm.md section 3.3): log_softmax(logits / T), renormalised over the top-p nucleus. Tolerances:
- HF engine vs HF forward: 2e-5. Same model and kernels; only the batch shape (left padding,
  several prompts) and KV-cache vs full forward change the float summation order (measured
  <= 3e-6).
- vLLM vs HF forward: 1e-4. Same fp32 weights, different kernels (vLLM's CPU attention, packed
  GEMMs) whose summation order may vary with the CPU's instruction set (measured <= 3e-6).
Both are orders of magnitude below the error a wrong distribution would give: raw instead of
tempered log-probs differ by > 1e-2 here (checked).

The tiny checkpoints use hidden 64 with 2 heads (head_dim 32): vLLM's CPU attention supports
head sizes 32, 64, 80, 96, ... only (head_dim 16 or 8 fails at the first forward with
"Unsupported CPU attention configuration"). They are made EOS-prone (a constant embedding
direction, stronger for EOS) so that short samples end with EOS often (~8% per token) and both
finish reasons occur.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import repo_data
from safetensors.torch import load_file, save_file

from actors.engines import SamplingSpec, local_checkpoint, make_engine
from actors.evaluator import Evaluator
from actors.generator import EngineWorker
from dqo_ray.algo import token_logprobs
from dqo_ray.config import load_config
from dqo_ray.models import load_policy, load_tokenizer, save_tiny_checkpoint
from dqo_ray.models.weight_broadcast import WeightSender, seats
from dqo_ray.models.weights import export_tensors
from dqo_ray.tasks.items import PromptItem

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~3 s start
os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("Tom", "has", "apples", "gives", "away", "How", "many", "left", "are")
QUESTIONS = ("Tom has 3 apples", "How many apples has Tom left ?",
             "Tom has 12 apples . Tom gives away 5 apples . How many apples are left ?")
VLLM_TOL = 1e-4
HF_TOL = 2e-5
MAX_NEW = 12


def _eos_prone_checkpoint(path: Path, seed: int) -> Path:
    save_tiny_checkpoint(path, WORDS, hidden_size=64, layers=2, heads=2, seed=seed)
    eos = load_tokenizer(path).eos_token_id
    file = path / "model.safetensors"
    state = load_file(file)
    embed = state["model.embed_tokens.weight"].clone()
    embed[:, 0] = 0.2  # a constant direction in the residual stream ...
    embed[eos, 0] = 0.3  # ... that the (tied) output embedding of EOS reads more strongly
    state["model.embed_tokens.weight"] = embed
    state["model.norm.weight"] = state["model.norm.weight"] * 5.0  # logit std ~0.7
    save_file(state, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return {name: _eos_prone_checkpoint(root / name, seed)
            for name, seed in (("old", 0), ("new", 1))}


@pytest.fixture(scope="module")
def tok(checkpoints):
    return load_tokenizer(checkpoints["old"])


@pytest.fixture(scope="module")
def prompts(tok):
    out = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=False)
        out.append(tok(text)["input_ids"])
    assert len({len(p) for p in out}) == len(out)  # different lengths
    return out


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {name: load_policy(path).eval() for name, path in checkpoints.items()}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def vllm_engine(checkpoints):
    """One in-process vLLM engine for the module, built through make_engine("auto")."""
    pytest.importorskip("vllm")
    set_num_threads = torch.set_num_threads
    records = _Records()
    logger = logging.getLogger("actors.engines.factory")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    try:
        engine = make_engine("auto", str(checkpoints["old"]), kv_cache_gb=1, seed=0)
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
    engine.choice_log = records.messages
    yield engine
    engine.close()
    # The in-process engine must not leak into later test modules.
    assert not torch.distributed.is_initialized()
    assert torch.set_num_threads is set_num_threads  # vLLM's override was undone


@pytest.fixture(scope="module")
def hf_engine(checkpoints):
    return make_engine("hf", str(checkpoints["old"]), seed=0)


# ---------------------------------------------------------------------------- references

@torch.no_grad()
def reference_logprobs(model, prompt: list[int], tokens: list[int], temperature: float,
                       top_p: float = 1.0) -> torch.Tensor:
    """Log-probs an HF forward pass (one unpadded sequence) assigns to `tokens` after `prompt`
    under softmax(logits / T) renormalised over the top-p nucleus (T = 0 -> untempered)."""
    ids = torch.tensor([prompt + tokens])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # scores tokens
    target = torch.tensor(tokens)
    temperature = temperature or 1.0
    if top_p >= 1.0:
        return token_logprobs(logits, target, temperature=temperature)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    probs, order = logp.exp().sort(dim=-1, descending=True)
    keep_sorted = (probs.cumsum(-1) - probs) < top_p  # mass strictly above a token < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    logp = logp.masked_fill(~keep, float("-inf"))
    logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    return logp.gather(-1, target[:, None]).squeeze(-1)


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def check_samples(results, prompts, spec: SamplingSpec, tok):
    """Shapes, decoding, EOS handling and finish reasons; returns the finish reasons seen."""
    assert len(results) == len(prompts)
    reasons = set()
    for samples in results:
        assert len(samples) == spec.n
        for s in samples:
            assert len(s.logprobs) == len(s.token_ids) >= 1
            assert all(lp <= 0.0 for lp in s.logprobs)
            assert s.text == tok.decode(s.token_ids, skip_special_tokens=True)
            assert tok.eos_token_id not in s.token_ids[:-1]
            if s.finish_reason == "stop":
                assert s.token_ids[-1] == tok.eos_token_id
                assert len(s.token_ids) <= spec.max_new_tokens
            else:
                assert s.finish_reason == "length"
                assert len(s.token_ids) == spec.max_new_tokens
                assert s.token_ids[-1] != tok.eos_token_id
            reasons.add(s.finish_reason)
    return reasons


def max_logprob_error(results, prompts, model, spec: SamplingSpec) -> tuple[float, float]:
    """(max |engine - reference|, max |engine - untempered full-softmax reference|)."""
    err, raw_gap = 0.0, 0.0
    for prompt, samples in zip(prompts, results, strict=True):
        for s in samples:
            got = torch.tensor(s.logprobs)
            ref = reference_logprobs(model, prompt, s.token_ids, spec.temperature, spec.top_p)
            raw = reference_logprobs(model, prompt, s.token_ids, 1.0)
            assert torch.isfinite(ref).all(), "sampled a token outside the nucleus"
            err = max(err, float((got - ref).abs().max()))
            raw_gap = max(raw_gap, float((got - raw).abs().max()))
    return err, raw_gap


SPECS = [  # (temperature, top_p)
    pytest.param(1.0, 1.0, id="T1"),
    pytest.param(0.7, 1.0, id="T0.7"),
    pytest.param(0.7, 0.8, id="T0.7-p0.8"),
    pytest.param(1.3, 0.5, id="T1.3-p0.5"),
]


# ---------------------------------------------------------------------------- interface

def test_sampling_spec_validation():
    with pytest.raises(ValueError, match="must be 1 for greedy"):
        SamplingSpec(n=2, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=None)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSpec(n=1, temperature=1.0, top_p=0.0, max_new_tokens=4, seed=None)
    with pytest.raises(ValueError, match="stop: .* non-empty strings"):
        SamplingSpec(stop=("\nQuestion:", ""))
    with pytest.raises(ValueError, match="stop: .* non-empty strings"):
        SamplingSpec(stop="\nQuestion:")  # a bare string would stop at each of its characters


def test_make_engine_bad_kind(checkpoints):
    with pytest.raises(ValueError, match=r"'trt' is not one of auto, vllm, hf"):
        make_engine("trt", str(checkpoints["old"]))


def test_make_engine_auto_falls_back_to_hf(checkpoints, monkeypatch, caplog):
    monkeypatch.setattr("actors.engines.factory.vllm_importable", lambda: False)
    with caplog.at_level(logging.INFO, logger="actors.engines.factory"):
        engine = make_engine("auto", str(checkpoints["old"]))
    assert engine.name == "hf"
    assert "generation engine: hf (vllm does not import" in caplog.text


def test_make_engine_auto_picks_vllm(vllm_engine):
    assert vllm_engine.name == "vllm"
    assert any(m.startswith("generation engine: vllm (vllm imports; kind=auto)")
               for m in vllm_engine.choice_log), vllm_engine.choice_log


def test_vllm_runs_in_the_engine_actors_process_on_cpu_unless_told():
    """generation.vllm_in_process: auto = in process on a CPU (one process importing vLLM, not
    three), vLLM's own choice on a GPU; the environment wins over auto; a set value wins."""
    from actors.engines.vllm_engine import MULTIPROCESSING_ENV, multiprocessing_env

    assert multiprocessing_env(None, True, {}) == {MULTIPROCESSING_ENV: "0"}
    assert multiprocessing_env(None, False, {}) == {}
    assert multiprocessing_env(None, True, {MULTIPROCESSING_ENV: "1"}) == {}
    assert multiprocessing_env(False, True, {MULTIPROCESSING_ENV: "0"}) == {
        MULTIPROCESSING_ENV: "1"}
    assert multiprocessing_env(True, False, {}) == {MULTIPROCESSING_ENV: "0"}
    assert load_config(None).generation.vllm_in_process is None


def test_local_checkpoint_copies_uri_top_level(tmp_path):
    src = tmp_path / "ckpt"
    (src / "optimizer").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "optimizer" / "state.pt").write_text("big")
    with local_checkpoint(str(src)) as local:
        assert local == str(src)
    with local_checkpoint(src.as_uri()) as local:
        assert sorted(os.listdir(local)) == ["config.json"]
        assert Path(local, "config.json").read_text() == "{}"
    assert not Path(local).exists()


# ---------------------------------------------------------------------------- HF engine

def test_hf_samples(hf_engine, prompts, tok):
    spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=3)
    results = hf_engine.generate(prompts, spec)
    assert check_samples(results, prompts, spec, tok) == {"stop", "length"}
    again = hf_engine.generate(prompts, spec)
    assert [[s.token_ids for s in r] for r in again] == [[s.token_ids for s in r] for r in results]
    other = hf_engine.generate(prompts, SamplingSpec(4, 1.0, 1.0, MAX_NEW, seed=4))
    assert [[s.token_ids for s in r] for r in other] != [[s.token_ids for s in r] for r in results]


@pytest.mark.parametrize(("temperature", "top_p"), SPECS)
def test_hf_logprobs_match_forward(hf_engine, hf_models, prompts, tok, temperature, top_p):
    spec = SamplingSpec(n=3, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW, seed=1)
    results = hf_engine.generate(prompts, spec)
    check_samples(results, prompts, spec, tok)
    err, raw_gap = max_logprob_error(results, prompts, hf_models["old"], spec)
    assert err < HF_TOL, err
    if (temperature, top_p) != (1.0, 1.0):
        assert raw_gap > 1e-2  # the check can tell the sampled distribution from the raw one


def test_hf_greedy_and_reload(checkpoints, hf_models, prompts, tok):
    engine = make_engine("hf", checkpoints["old"].as_uri())  # a URI is copied to a temp folder
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=None)
    for step, name in enumerate(("old", "new", "old")):
        if step == 1:
            engine.load_weights(checkpoints["new"].as_uri())
        elif step == 2:
            broadcast_to(engine, hf_models["old"])
        results = engine.generate(prompts, spec)
        check_samples(results, prompts, spec, tok)
        for prompt, (s,) in zip(prompts, results, strict=True):
            assert s.token_ids == hf_greedy(hf_models[name], prompt, MAX_NEW, tok.eos_token_id)
        err, _ = max_logprob_error(results, prompts, hf_models[name], spec)
        assert err < HF_TOL, err


# ---------------------------------------------------------------------------- vLLM engine

def test_vllm_samples(vllm_engine, prompts, tok):
    spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=3)
    results = vllm_engine.generate(prompts, spec)
    assert check_samples(results, prompts, spec, tok) == {"stop", "length"}
    for samples in results:  # n distinct samples per prompt
        assert len({tuple(s.token_ids) for s in samples}) > 1
    again = vllm_engine.generate(prompts, spec)
    assert [[s.token_ids for s in r] for r in again] == [[s.token_ids for s in r] for r in results]


@pytest.mark.parametrize(("temperature", "top_p"), SPECS)
def test_vllm_logprobs_match_forward(vllm_engine, hf_models, prompts, tok, temperature, top_p):
    spec = SamplingSpec(n=3, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW, seed=1)
    results = vllm_engine.generate(prompts, spec)
    check_samples(results, prompts, spec, tok)
    err, raw_gap = max_logprob_error(results, prompts, hf_models["old"], spec)
    assert err < VLLM_TOL, err
    if (temperature, top_p) != (1.0, 1.0):
        assert raw_gap > 1e-2  # vLLM's default raw log-probs would fail this test


def test_vllm_reload_weights(vllm_engine, checkpoints, hf_models, prompts, tok):
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=None)
    expected = {name: [hf_greedy(model, p, MAX_NEW, tok.eos_token_id) for p in prompts]
                for name, model in hf_models.items()}
    assert expected["old"] != expected["new"]

    def check(name):
        results = vllm_engine.generate(prompts, greedy)
        check_samples(results, prompts, greedy, tok)
        assert [s.token_ids for (s,) in results] == expected[name]
        err, _ = max_logprob_error(results, prompts, hf_models[name], greedy)  # untempered
        assert err < VLLM_TOL, err
        sampled = SamplingSpec(n=2, temperature=0.7, top_p=0.9, max_new_tokens=MAX_NEW, seed=5)
        results = vllm_engine.generate(prompts, sampled)
        err, _ = max_logprob_error(results, prompts, hf_models[name], sampled)
        assert err < VLLM_TOL, err

    check("old")
    vllm_engine.load_weights(str(checkpoints["new"]))
    check("new")
    broadcast_to(vllm_engine, hf_models["old"])
    check("old")
    vllm_engine.load_weights(checkpoints["new"].as_uri())  # via the URI copy path
    check("new")
    vllm_engine.load_weights(str(checkpoints["old"]))  # as the module's other tests expect


def broadcast_to(engine, model) -> None:
    """The trainer's broadcast (generation.weight_transfer=broadcast) over gloo, from a sender
    thread here to the engine's worker as a group of two."""
    sender = WeightSender(export_tensors(model.state_dict()), "gloo", "127.0.0.1", 60)
    engine.load_weights(seats(sender.offer, engines=1, workers_per_engine=1)[0])
    assert sender.sent.wait(10) and sender.error is None
    sender.close()


# ---------------------------------------------------------------------------- stop strings

def first_stop(tok, tokens: list[int], stops: tuple[str, ...]) -> int | None:
    """Reference: the index of the token after which the decoded response first holds a stop
    string, or None."""
    for t in range(len(tokens)):
        if any(stop in tok.decode(tokens[: t + 1], skip_special_tokens=True) for stop in stops):
            return t
    return None


def cut_before_stop(text: str, stops: tuple[str, ...]) -> str:
    """Reference: `text` up to the stop string that ends first (ties: the first listed)."""
    found = [(text.find(s) + len(s), k, text.find(s)) for k, s in enumerate(stops) if s in text]
    return text[: min(found)[2]] if found else text


def stops_written_by(responses: list[list[int]], tok) -> tuple[str, ...]:
    """Two stop strings that free responses (token ids) write mid-response, from two different
    responses: the text of two tokens (a stop string across tokens) and of one token."""
    picked: list[str] = []
    for ids in responses:
        words = [tok.decode([t]) for t in ids[1:4] if t != tok.eos_token_id]
        if len(words) == 3 and all(w.strip() for w in words):
            picked.append("".join(words[:2]) if not picked else words[0])
            if len(picked) == 2:
                return tuple(picked)
    raise AssertionError("too few long free responses to draw stop strings from")


def check_stop_strings(engine, prompts, tok, tol: float) -> None:
    """Samples with stop strings are the free samples (same seed) cut at the token that
    completes the first stop string: same tokens and log-probs up to it, finish_reason "stop",
    the text ending before the stop string; samples without one are unchanged."""
    free_spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=11)
    free = engine.generate(prompts, free_spec)
    stops = stops_written_by([f.token_ids for samples in free for f in samples], tok)
    stopped = engine.generate(prompts, dataclasses.replace(free_spec, stop=stops))
    ended = unchanged = 0
    for free_samples, stopped_samples in zip(free, stopped, strict=True):
        for f, s in zip(free_samples, stopped_samples, strict=True):
            end = first_stop(tok, f.token_ids, stops)
            if end is None:
                assert (s.token_ids, s.text, s.finish_reason) == \
                    (f.token_ids, f.text, f.finish_reason)
                unchanged += 1
                continue
            assert s.token_ids == f.token_ids[: end + 1]
            assert s.finish_reason == "stop" and s.token_ids[-1] != tok.eos_token_id
            assert s.text == cut_before_stop(tok.decode(s.token_ids, skip_special_tokens=True),
                                             stops)
            assert not any(stop in s.text for stop in stops)
            assert s.logprobs == pytest.approx(f.logprobs[: end + 1], abs=tol)
            ended += 1
    assert ended >= 2 and unchanged >= 1, (ended, unchanged, stops)


def test_hf_stop_strings(hf_engine, prompts, tok):
    check_stop_strings(hf_engine, prompts, tok, HF_TOL)


def test_vllm_stop_strings(vllm_engine, prompts, tok):
    check_stop_strings(vllm_engine, prompts, tok, VLLM_TOL)


class RecordingEngine:
    """A real engine, wrapped to keep the SamplingSpecs it is asked for."""

    def __init__(self, engine) -> None:
        self.engine, self.name, self.specs = engine, engine.name, []

    def generate(self, prompts, spec):
        self.specs.append(spec)
        return self.engine.generate(prompts, spec)

    def load_weights(self, checkpoint_dir):
        self.engine.load_weights(checkpoint_dir)


def test_generator_samples_with_its_items_stop_strings(checkpoints, prompts, tok):
    """The wire from the task to sampling in the generator: an item's stop strings reach the
    engine's SamplingSpec, and the stored responses end where they say."""
    cfg = load_config(None, ["generation.engine=hf", "generation.samples_per_prompt=4",
                             f"generation.max_new_tokens={MAX_NEW}"])
    worker = EngineWorker(cfg, str(checkpoints["old"]))
    worker.engine = RecordingEngine(worker.engine)

    def items(stop):
        return [PromptItem(f"toy/{i}", "toy", "gsm8k", "", p, "3", (), stop)
                for i, p in enumerate(prompts)]

    free, _ = worker.run_chunk(items(()), round=0, policy_version=0)
    stops = stops_written_by([r["response_ids"] for r in free], tok)
    stopped, _ = worker.run_chunk(items(stops), round=0, policy_version=0)
    assert [spec.stop for spec in worker.engine.specs] == [(), stops]
    ended = 0
    for f, s in zip(free, stopped, strict=True):
        end = first_stop(tok, f["response_ids"], stops)
        if end is not None:
            assert s["response_ids"] == f["response_ids"][: end + 1]
            assert s["finish_reason"] == "stop" and not any(x in s["response"] for x in stops)
            ended += 1
    assert ended >= 2


def test_evaluator_samples_with_its_items_stop_strings(checkpoints, tmp_path):
    """The evaluator builds plain-template prompts for a tokenizer without a chat template;
    both its greedy and its sampled calls then stop at the next "Question:"."""
    plain = tmp_path / "plain"
    shutil.copytree(checkpoints["old"], plain)
    (plain / "chat_template.jinja").unlink()
    assert not load_tokenizer(plain).chat_template
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "eval.datasets=[gsm8k]",
                             f"eval.sources.gsm8k={repo_data('gsm8k')}", "eval.limit=3",
                             "eval.samples=2", f"eval.max_new_tokens={MAX_NEW}"])
    engine = RecordingEngine(make_engine("hf", str(plain), seed=0))
    evaluator = Evaluator(cfg, str(plain), cfg.run.run_dir, engine=engine)
    assert {i.stop for i in evaluator.items["gsm8k"]} == {("\nQuestion:",)}
    evaluator.evaluate(str(plain), step=1)
    assert [spec.stop for spec in engine.specs] == [("\nQuestion:",)] * 2
