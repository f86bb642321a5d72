"""Autoscaling for real (issue 26): `ray job submit` of the ci-small pipeline to a cluster that
is only a head with 0 CPUs, started by `cluster/local_cluster.sh autoscale` with Ray's own
autoscaler and its fake multi-node provider (each node it launches is one more raylet here;
node types from cluster/autoscaling_local.yaml, which mirror cluster/aws.yaml's roles through
the same markers). The pipeline asks for its whole plan at once; the autoscaler starts a node
of each type; every role runs on the type meant for it; the job succeeds; pipeline.md says
what was requested and when each node came; after the job the nodes go (the autoscaler's own
status, polled). About 75 s alone, 2 minutes inside the suite."""

import re
import subprocess
import time
from collections import Counter

import pytest
from test_pipeline import REPO, _env, _logs, _ray, _submit, _wait

from dqo_ray.capacity import NODES_FILE
from dqo_ray.io import read_jsonl
from dqo_ray.runtime import PLACEMENT_FILE

SCRIPT = str(REPO / "cluster" / "local_cluster.sh")
# Its own ports and temp dir: never another test's cluster, nor the session's Ray.
CLUSTER_ENV = {"RAY_LOCAL_PORT": "6394", "RAY_LOCAL_DASHBOARD_PORT": "8279",
               "RAY_LOCAL_TMP": "/tmp/ray_as", "RAY_LOCAL_AGENT_PORT_BASE": "23500"}
HEAD = "ray.head.default"
# Which node type each role's marker (ray.role_resources) sends it to.
ROLE_TYPES = {"train-worker": "train_cpu", "generator": "gen_cpu", "evaluator": "eval_cpu"}
TYPE_MARKERS = {"dqo_trainer": "train_cpu", "dqo_generator": "gen_cpu",
                "dqo_evaluator": "eval_cpu"}


def _script(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([SCRIPT, *args], cwd=REPO, env={**_env(), **CLUSTER_ENV},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"local_cluster.sh {' '.join(args)}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def autoscaling_cluster():
    try:  # (stopped even when it started only in part)
        out = _script("autoscale").stdout.split()
        yield out[0], out[-1]  # GCS address, job submission address
    finally:
        subprocess.run([SCRIPT, "stop"], cwd=REPO, env={**_env(), **CLUSTER_ENV}, timeout=120)


def autoscaler_nodes(gcs: str) -> Counter:
    """Node type -> count of the active nodes, from the autoscaler's own status (`ray status`)."""
    out = _ray("status", "--address", gcs).stdout
    active = re.search(r"Active:\n(.*?)\nPending:", out, re.S)
    assert active, out
    return Counter({kind: int(n) for n, kind in re.findall(r"^\s*(\d+) (\S+)", active.group(1),
                                                           re.M)})


def _until(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while (value := condition()) is False or value is None:
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(2)
    return value


@pytest.mark.ray
def test_a_submitted_pipeline_grows_the_nodes_it_needs_and_they_go_when_idle(
        autoscaling_cluster, tmp_path):
    gcs, address = autoscaling_cluster
    assert autoscaler_nodes(gcs) == Counter({HEAD: 1})  # nothing but the head at first
    run = tmp_path / "ci-small"
    # Without a working_dir: all the fake nodes share this machine's session folder, and the
    # job's unpacked working_dir vanished there as nodes joined (workers whose current folder
    # it was died: "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"); on a real cluster each
    # node unpacks its own. The project is installed here, so the job needs none.
    _submit(address, "autoscaled", tmp_path, "pipeline.rounds=1", "ray.role_resources=true",
            f"ray.cluster={REPO / 'cluster' / 'autoscaling_local.yaml'}", working_dir=False)
    status = _wait(address, "autoscaled", lambda s: s in ("SUCCEEDED", "FAILED"), 900)
    log = _logs(address, "autoscaled")
    assert status == "SUCCEEDED", log[-6000:]

    # Asked for the whole plan at once, and every node type came.
    assert "asked the autoscaler for the whole run at once: trainer 1 x" in log, log[-4000:]
    records = read_jsonl(run / NODES_FILE)
    events = [r["event"] for r in records]
    assert events[:2] == ["present", "requested"], records  # the bare head, then the request
    assert events.count("requested") == 1
    assert records[-1]["event"] == "released"
    came = {r["node"]: r["resources"] for r in records if r["event"] == "came"}
    types = {name: next(t for m, t in TYPE_MARKERS.items() if m in what)
             for name, what in came.items()}
    assert set(types.values()) == set(TYPE_MARKERS.values()), came
    # Each role ran on its node type (placement.jsonl: the node of every actor and worker).
    for p in read_jsonl(run / PLACEMENT_FILE):
        if p["role"] in ROLE_TYPES:
            [node] = [name for name in types if name.endswith(f"({p['node_id'][-12:]})")]
            assert types[node] == ROLE_TYPES[p["role"]], (p, came)
    summary = (run / "pipeline.md").read_text()
    assert "## Nodes" in summary and "| requested |" in summary, summary
    assert summary.count("| came |") == len(came), summary

    # After the job the request is withdrawn and idle nodes go (15 s idle timeout).
    _until(lambda: autoscaler_nodes(gcs) == Counter({HEAD: 1}), "the nodes removed when idle",
           timeout=180)
