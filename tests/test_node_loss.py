"""A whole worker node lost while the pipeline runs, as when a spot instance is preempted:
`ray job submit` to a local cluster of a head and three worker nodes
(cluster/local_cluster.sh), then `kill-node` (SIGKILL to a node's raylet and every process
under it) once while round 0 is generating and once while it is training. The job
must still finish, with every prompt's samples stored exactly once and no row trained twice
within an epoch; the test prints what was lost and re-done."""

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from test_pipeline import REPO, _env, _logs, _status, _submit, _wait
from test_train_ray import assert_exact_epoch_accounting, final_history

from dqo_ray.data.store import TrajectoryStore
from dqo_ray.io import read_jsonl
from dqo_ray.run_state import STATE_FILE

SCRIPT = str(REPO / "cluster" / "local_cluster.sh")
# Its own ports and temp dir: never the two-node cluster of test_pipeline.py, nor the
# session's Ray. The head holds no CPU, so all work is on worker nodes (which may be lost).
CLUSTER_ENV = {"RAY_LOCAL_PORT": "6392", "RAY_LOCAL_DASHBOARD_PORT": "8277",
               "RAY_LOCAL_TMP": "/tmp/ray_nl", "RAY_LOCAL_AGENT_PORT_BASE": "23300",
               # ci-small needs up to 3.5 CPUs at once: one node of 4 can still hold it.
               "RAY_LOCAL_HEAD_CPUS": "0", "RAY_LOCAL_WORKER_CPUS": "4",
               # A killed node refuses the checks at once: dead after ~10 s (Ray's defaults:
               # ~15 s). A live node stalled by the suite's load (its checks time out after
               # 5 s each) must miss 10 in a row, ~1 min: 3 x 1 s once killed a healthy node.
               "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "5000", "RAY_health_check_failure_threshold": "10"}
PROMPTS, SAMPLES, STEPS = 64, 2, 32  # ~15 s of training: still going when a node is lost
OVERRIDES = ["pipeline.rounds=1", f"task.limit={PROMPTS}",
             "generation.chunk_prompts=4",  # 16 chunks
             f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=4", "trainer.ledger=true"]


def _script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([SCRIPT, *args], cwd=REPO, env={**_env(), **CLUSTER_ENV},
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"local_cluster.sh {' '.join(args)}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def three_worker_cluster():
    try:  # (stopped even when it started only in part)
        yield _script("start", "3").stdout.split()[-1]
    finally:
        subprocess.run([SCRIPT, "stop"], cwd=REPO, env={**_env(), **CLUSTER_ENV}, timeout=120)


def _worker_node_of(pid: int) -> int:
    """The local_worker_I marker of the raylet that `pid` (a Ray worker) runs under."""
    while pid > 1:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        found = re.search(r"raylet.*local_worker_(\d+),", cmdline)
        if found:
            return int(found.group(1))
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise AssertionError("not under a worker node's raylet")


def _placements(run: Path) -> list[dict]:
    return [p for path in sorted(run.rglob("placement.jsonl")) for p in read_jsonl(path)]


def _committed(train_dir: Path) -> list[str]:
    """The checkpoints Ray Train has registered (a restart resumes from the newest); a folder
    on disk is not yet one of them."""
    try:
        snapshot = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-write
        return []
    return [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]


def _until(condition, what: str, job: str, address: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, \
            f"{what}: not in {timeout}s; job log tail:\n{_logs(address, job)[-6000:]}"
        assert _status(address, job) in ("PENDING", "RUNNING"), _logs(address, job)[-4000:]
        time.sleep(0.2)


@pytest.mark.ray
def test_pipeline_survives_losing_a_node_while_generating_and_one_while_training(
        three_worker_cluster, tmp_path, fault_summary):
    address, job, run = three_worker_cluster, "node-loss", tmp_path / "ci-small"
    _submit(address, job, tmp_path, *OVERRIDES)

    # (a) Round 0 is generating: lose the node of an engine (the evaluator's, if it shares one).
    _until(lambda: "generation round 0:" in _logs(address, job), "round 0 sampling", job,
           address)
    placed = _placements(run)
    evaluator = {_worker_node_of(p["pid"]) for p in placed if p["role"] == "evaluator"}
    engines = [_worker_node_of(p["pid"]) for p in placed if p["role"] == "generator"]
    lost_a = next((n for n in engines if n in evaluator), engines[0])
    _script("kill-node", str(lost_a))
    killed_a = time.time()

    # (b) Round 0 is training and Ray Train has committed a checkpoint: lose the trainer's node.
    _until(lambda: _committed(run / "train"), "round 0's first committed checkpoint", job,
           address)
    trainer = [p for p in read_jsonl(run / "placement.jsonl") if p["role"] == "train-worker"]
    lost_b = _worker_node_of(trainer[-1]["pid"])
    _script("kill-node", str(lost_b))
    killed_b = time.time()

    status = _wait(address, job, lambda s: s in ("SUCCEEDED", "FAILED"), 900)
    log = _logs(address, job)
    assert status == "SUCCEEDED", log[-6000:]

    # Every prompt's samples exactly once.
    store = TrajectoryStore(str(tmp_path / "store"))
    assert store.rounds() == [0]
    rows = store.read_table(store.shards([0]), ["traj_id", "prompt_id"]).to_pydict()
    assert len(rows["traj_id"]) == len(set(rows["traj_id"])) == PROMPTS * SAMPLES
    assert set(Counter(rows["prompt_id"]).values()) == {SAMPLES}
    # No row trained twice within an epoch; every step trained.
    assert_exact_epoch_accounting(run / "ledger", STEPS, world=1)
    records = list(read_jsonl(run / "ledger" / "rank0.jsonl"))
    redone = [rec for rec in records if rec["time"] > killed_b]
    kept = final_history(run / "ledger")[0]
    repeated = sorted({rec["step"] for rec in records if rec["time"] <= killed_b}
                      & {rec["step"] for rec in redone})
    # Ray Train restarted the trainer from its last committed checkpoint (step 4 or later).
    resumed = [int(k) for k in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert resumed and resumed[-1] >= 4, log[-6000:]
    assert min(rec["step"] for rec in redone) == resumed[-1] + 1, records
    assert all(kept[rec["step"]] == rec for rec in redone)
    # Each checkpoint was evaluated once, over the lost evaluator if there was one.
    results = list(read_jsonl(run / "results.jsonl"))
    assert {r["round"] for r in results} == {None, 0}
    scored = [r["checkpoint"] for r in results]
    assert len(scored) == len(set(scored))
    assert "round0/evaluate" in json.loads((run / STATE_FILE).read_text())["stages"]
    replaced = [int(n) for n in re.findall(r"round 0 data: .*?actors replaced (\d+)", log)]
    assert replaced and replaced[0] >= 1, log[-6000:]
    evaluator_lost = lost_a in evaluator
    assert "evaluator lost" in log or not evaluator_lost

    first_redo = min(rec["time"] for rec in redone)
    step_s = (max(r["time"] for r in records) - first_redo) / max(len(redone) - 1, 1)
    fault_summary(f"node {lost_a} lost while generating round 0: {replaced[0]} engine(s) "
                  f"replaced, their chunks re-issued; evaluator "
                  f"{'re-created' if evaluator_lost else 'not there'}")
    fault_summary(f"node {lost_b} lost while training round 0: steps {repeated or 'none'} "
                  f"trained again (~{len(repeated) * step_s:.1f}s of training), training "
                  f"resumed {first_redo - killed_b:.0f}s after the loss; the whole job took "
                  f"{time.time() - killed_a:.0f}s after the first loss")
