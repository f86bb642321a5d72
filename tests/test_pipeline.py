"""The pipeline job: its state file (pure), the per-round table, and the whole job submitted
with `ray job submit` to a local two-node cluster, stopped mid-round and re-submitted."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dqo_ray.config import load_config, to_dict
from dqo_ray.data.store import TrajectoryStore
from dqo_ray.evaluation.report import round_table
from dqo_ray.run_state import STATE_FILE, RunState, StateError

REPO = Path(__file__).resolve().parents[1]


# -- state file ---------------------------------------------------------------------------------

def test_state_records_stages_and_resumes(tmp_path):
    config = to_dict(load_config(None))
    state = RunState(tmp_path, config)
    assert state.attempt == 0 and state.finished("round0/data") is None
    state.finish("round0/data", 1.5, samples=16)
    state.finish("round0/evaluate", 0.5)  # an empty result is still a finished stage
    again = RunState(tmp_path, config)  # a restarted driver
    assert again.attempt == 1
    assert again.finished("round0/data") == {"samples": 16}
    assert again.done("round0/evaluate") and again.finished("round0/evaluate") == {}
    assert not again.done("round1/evaluate") and again.finished("round1/evaluate") is None
    assert again.stages["round0/data"]["attempt"] == 0  # finished by the first start
    assert json.loads((tmp_path / STATE_FILE).read_text())["attempts"][0] == state.attempts[0]


def test_state_refuses_another_configuration_but_allows_more_rounds(tmp_path):
    RunState(tmp_path, to_dict(load_config(None)))
    more_rounds = to_dict(load_config(None, ["pipeline.rounds=5", "ray.num_cpus=8"]))
    RunState(tmp_path, more_rounds)  # extending a run, or moving it, is allowed
    with pytest.raises(StateError, match=r"another configuration \(algo.beta: 0.1 -> 0.2\)"):
        RunState(tmp_path, to_dict(load_config(None, ["algo.beta=0.2"])))


def test_state_of_a_run_from_before_the_grading_section_resumes(tmp_path):
    older = to_dict(load_config(None))
    del older["grading"]  # as recorded before the section existed
    RunState(tmp_path, older)
    RunState(tmp_path, to_dict(load_config(None, ["grading.workers=4", "grading.timeout_s=9"])))


def test_state_of_a_run_from_before_a_new_setting_resumes_while_it_is_at_its_default(tmp_path):
    older = to_dict(load_config(None))
    del older["generation"]["max_num_seqs"], older["model"]["attn_implementation"]
    RunState(tmp_path, older)  # recorded before the two settings existed
    with pytest.raises(StateError, match=r"\(model.attn_implementation: None -> 'sdpa'\)"):
        RunState(tmp_path, to_dict(load_config(None, ["model.attn_implementation=sdpa"])))
    RunState(tmp_path, to_dict(load_config(None)))  # at their defaults: no change


def test_state_file_that_is_not_ours_is_named(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(StateError, match=f"{STATE_FILE}: not a pipeline state file"):
        RunState(tmp_path, {})


def test_round_table_compares_rounds_with_the_start():
    rows = [
        {"checkpoint": "warm", "step": 0, "round": None, "dataset": "tinymath", "n": 4,
         "greedy_acc": 0.25, "sample_acc": 0.2},
        {"checkpoint": "r0/ckpt2", "step": 2, "round": 0, "dataset": "tinymath", "n": 4,
         "greedy_acc": 0.0, "sample_acc": 0.1},
        {"checkpoint": "r0/ckpt4", "step": 4, "round": 0, "dataset": "tinymath", "n": 4,
         "greedy_acc": 0.5, "sample_acc": 0.3},
        {"checkpoint": "r1/ckpt4", "step": 8, "round": 1, "dataset": "tinymath", "n": 4,
         "greedy_acc": 0.75, "sample_acc": 0.45},
    ]
    lines = round_table(rows).splitlines()
    assert lines[0] == "|  | step | tinymath | tinymath sample |"
    assert lines[2] == "| start | 0 | 25.0 | 20.0 |"
    assert lines[3] == "| round 0 | 4 | 50.0 (+25.0) | 30.0 (+10.0) |"  # the round's last
    assert lines[4] == "| round 1 | 8 | 75.0 (+50.0) | 45.0 (+25.0) |"
    assert "tinymath n=4" in lines[5]


# -- the job on a local multi-node cluster --------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `python` = this venv's
    env["RAY_AUTH_MODE"] = "disabled"  # the loopback test cluster (cluster/local_cluster.sh)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def local_cluster():
    """Head + one worker node (2 CPUs each) started by cluster/local_cluster.sh."""
    script = str(REPO / "cluster" / "local_cluster.sh")
    try:  # (stopped even when it started only in part)
        started = subprocess.run([script, "start", "1"], cwd=REPO, env=_env(),
                                 capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"local_cluster.sh start: {started.stderr[-3000:]}"
        yield started.stdout.split()[-1]  # the job submission address
    finally:
        subprocess.run([script, "stop"], cwd=REPO, env=_env(), timeout=120)


def _ray(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _submit(address: str, job_id: str, out: Path, *overrides: str,
            working_dir: bool = True) -> None:
    """`ray job submit` of the ci-small pipeline writing under `out`, with `overrides`; with
    the working tree shipped as the job's working_dir (as on a real cluster), or else run from
    the installed project (paths in `overrides` must then be absolute)."""
    deadline = time.monotonic() + 120
    sets = [a for o in [f"run.output_dir={out}", f"data.store={out}/store", *overrides]
            for a in ("--set", o)]
    env = (["--runtime-env", "cluster/runtime_env.yaml", "--working-dir", "."] if working_dir
           else ["--runtime-env-json", '{"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}'])
    config = "configs/ci-small.yaml" if working_dir else str(REPO / "configs" / "ci-small.yaml")
    while True:
        result = _ray("job", "submit", "--address", address, "--submission-id", job_id, *env,
                      "--no-wait", "--", "python", "-m", "jobs.pipeline", "--config", config,
                      *sets)
        # A node's job agent comes up a little after `ray start` returns.
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def _client(address: str):
    """A job client for the loopback test cluster (no token auth). The switch is set only
    around the call: later tests' jobs join the session's own Ray, which checks tokens."""
    from ray.job_submission import JobSubmissionClient

    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield JobSubmissionClient(address)
    finally:
        if before is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = before


def _status(address: str, job_id: str) -> str:
    with _client(address) as client:
        return str(client.get_job_status(job_id).value)


def _logs(address: str, job_id: str) -> str:
    with _client(address) as client:
        return client.get_job_logs(job_id)


def _wait(address: str, job_id: str, until, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(address, job_id)
        if until(status):
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s; log tail:\n"
                         f"{_logs(address, job_id)[-4000:]}")


@pytest.mark.ray
def test_submitted_pipeline_survives_a_stop_and_uses_both_nodes(local_cluster, tmp_path):
    run = tmp_path / "ci-small"
    state_file = run / STATE_FILE

    def stages() -> dict:
        return json.loads(state_file.read_text())["stages"] if state_file.exists() else {}

    # 1. Submit, and stop the job once round 0 has trained (round 1 is then under way).
    _submit(local_cluster, "pipeline-1", tmp_path)
    deadline = time.monotonic() + 900
    while "round0/train" not in stages():
        assert time.monotonic() < deadline, "round 0 did not finish training in time"
        assert _status(local_cluster, "pipeline-1") in ("PENDING", "RUNNING"), \
            _logs(local_cluster, "pipeline-1")[-4000:]
        time.sleep(2)
    assert _ray("job", "stop", "--address", local_cluster, "pipeline-1").returncode == 0
    # (a small job: the stop usually lands while round 1 trains, but round 1 may finish, and
    # even the job, before it takes effect; both are checked below, neither is a failure)
    _wait(local_cluster, "pipeline-1", lambda s: s in ("STOPPED", "SUCCEEDED"), 120)
    first = stages()
    assert {"start/tiny", "round0/data", "round0/reference", "round0/train"} <= set(first)
    round1_left = "round1/train" not in first
    store = TrajectoryStore(str(tmp_path / "store"))
    round0_shards = store.shards([0])

    # 2. Re-submit the same command: it continues from the state file and succeeds.
    _submit(local_cluster, "pipeline-2", tmp_path)
    status = _wait(local_cluster, "pipeline-2", lambda s: s in ("SUCCEEDED", "FAILED"), 900)
    log = _logs(local_cluster, "pipeline-2")
    assert status == "SUCCEEDED", log[-4000:]
    final = stages()
    for stage, record in first.items():  # nothing finished by the first start ran again
        assert final[stage] == record, stage
    assert all(record["attempt"] == 1 for stage, record in final.items() if stage not in first)
    assert set(final) >= {"round1/train", "round1/evaluate", "round0/evaluate"}
    assert final["round1/reference"]["result"]["rows"] == 0  # the engines scored round 1
    # One Ray Train run per submission, whatever the number of rounds it trained (worker
    # lines reach the job's log twice: count the starts they name); none with nothing left.
    starts = set(re.findall(r"trainer worker group start (\d+) ", log))
    assert starts == ({"1"} if round1_left else set()), log[-4000:]
    if round1_left:
        assert final["round1/train"]["attempt"] == 1
    assert "resuming" in log and "round0/train" in log
    assert store.shards([0]) == round0_shards  # round 0's data untouched

    # 3. The run folder holds both rounds' data, checkpoints, evaluations and the report.
    assert store.rounds() == [0, 1]
    assert store.num_rows([1]) == 8 * 2  # task.limit prompts x samples_per_prompt
    for r in (0, 1):
        checkpoint = Path(final[f"round{r}/train"]["result"]["policy"])
        assert (checkpoint / "config.json").exists() and checkpoint.is_relative_to(run)
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert {r["round"] for r in results} == {None, 0, 1}
    scored = [(r["checkpoint"], r["dataset"]) for r in results]
    assert len(scored) == len(set(scored))  # nothing evaluated twice across the restart
    assert all(0.0 <= r["greedy_acc"] <= 1.0 and r["n"] == 8 for r in results)
    report = (run / "report.md").read_text()
    assert "## Rounds" in report and "| round 1 |" in report and "## Pipeline stages" in report
    assert (run / "accuracy.png").stat().st_size > 0

    # 4. Work ran on both nodes: read from the recorded placement, not from timing.
    placement = [json.loads(line) for path in run.rglob("placement.jsonl")
                 for line in path.read_text().splitlines()]
    roles = {p["role"] for p in placement}
    assert {"generator", "evaluator", "train-worker"} <= roles
    assert len({p["node_id"] for p in placement}) == 2, placement

    # 5. Submitting the finished run again re-prints its report: no stage runs again and no
    # evaluator (a vLLM engine) is started for nothing.
    _submit(local_cluster, "pipeline-3", tmp_path)
    status = _wait(local_cluster, "pipeline-3", lambda s: s in ("SUCCEEDED", "FAILED"), 300)
    assert status == "SUCCEEDED", _logs(local_cluster, "pipeline-3")[-4000:]
    assert {s: r["attempt"] for s, r in stages().items()} == \
        {s: r["attempt"] for s, r in final.items()}
    evaluators = [line for line in (run / "placement.jsonl").read_text().splitlines()
                  if '"evaluator"' in line]
    # the first submission's, and the second's when it had evaluations left to do
    left = any(stage.endswith("evaluate") and stage not in first for stage in final)
    assert len(evaluators) == 1 + left
