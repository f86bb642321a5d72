"""Shared test set-up: offline hubs, quiet progress bars, one thread per torch process."""

import os
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# vLLM engines run in-process in tests: ~3 s start instead of 25-60 s.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# transformers / huggingface_hub read the offline switches at import time: import them after.
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
torch.set_num_threads(1)

# Real GSM8K / MATH files (with their licences), carried in the repository: data/README.md.
DATA = REPO / "data"


def repo_data(sub: str) -> Path:
    """A data set folder of the repository (data/gsm8k, data/math). They are committed, so a
    missing one is a broken checkout: fail, never skip."""
    path = DATA / sub
    assert path.is_dir(), f"{path} is missing: the repository's data folder is incomplete"
    return path


TINY_WORDS = ("Tom", "has", "apples", "gives", "away", "How", "many", "left")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random policy + tokenizer saved as an HF checkpoint folder."""
    from dqo_ray.models import save_tiny_checkpoint

    # head_dim 32: the smallest vLLM's CPU attention supports
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_WORDS, hidden_size=64,
                                layers=2, heads=2, seed=0)


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole session (4 logical CPUs, as init_ray gives 2-core
    machines); jobs started as subprocesses join it through this address."""
    import logging

    import ray

    from dqo_ray.runtime import WORKER_ENV

    ray.init(num_cpus=4, runtime_env={"env_vars": WORKER_ENV}, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_toy_store(root: Path, checkpoint: Path, shards: int = 2, rows_per_shard: int = 64,
                    response_len: int = 6, seed: int = 0, paired: bool = False,
                    correct: Callable[[int, int], bool] | None = None,
                    step_values: Callable[[bool], list[float]] | None = None):
    """A store of toy trajectories: chat-templated prompts, random responses ending in EOS,
    every other one rewarded (correct). behaviour_logprobs unknown (null), as for external data.
    paired=True: rows 2k and 2k+1 of a shard share one prompt (one correct, one not), so DPO
    finds pairs; otherwise a prompt's rows are all correct or all incorrect.
    `correct(shard, i)` replaces the every-other-row rule. `step_values(correct)` gives two
    steps (ending at response token 2 and at EOS) the returned success rates."""
    from dqo_ray.data.store import TrajectoryStore
    from dqo_ray.models import load_tokenizer

    tok = load_tokenizer(checkpoint)
    store = TrajectoryStore(str(root))
    gen = torch.Generator().manual_seed(seed)
    ok = correct or (lambda shard, i: i % 2 == 0)
    for shard in range(shards):
        rows = []
        for i in range(rows_per_shard):
            k = i // 2 if paired else i
            prompt = tok.apply_chat_template([{"role": "user", "content": f"Tom has {k} apples"}],
                                             add_generation_prompt=True, tokenize=False)
            response = torch.randint(10, len(tok), (response_len,), generator=gen).tolist()
            response.append(tok.eos_token_id)
            rows.append(dict(
                traj_id=f"s{shard}-{i}", prompt_id=f"p{k}", round=0, policy_version=0,
                dataset="toy", prompt=prompt, response=tok.decode(response),
                prompt_ids=tok(prompt)["input_ids"], response_ids=response,
                behaviour_logprobs=None, reward=float(ok(shard, i)), correct=ok(shard, i),
                finish_reason="stop", step_ends=None, step_rewards=None, ref_logprobs=None))
            if step_values is not None:
                rows[-1].update(step_ends=[2, response_len], step_rewards=[0.0, 0.0],
                                step_values=step_values(ok(shard, i)))
        store.write_shard(rows, round=0)
    return store


# What the fault tests lost and re-did, shown at the end of the run even though pytest captures
# a passing test's output (CI logs it).
_FAULT_SUMMARY: list[str] = []


@pytest.fixture
def fault_summary() -> Callable[[str], None]:
    return _FAULT_SUMMARY.append


def pytest_terminal_summary(terminalreporter) -> None:
    if _FAULT_SUMMARY:
        terminalreporter.section("fault tests: what was lost and re-done")
        for line in _FAULT_SUMMARY:
            terminalreporter.write_line(line)
