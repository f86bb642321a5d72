"""Autoscaling start: from `ray job submit` to the first sample on a cluster that is only a head,
with and without the pipeline's up-front request for its whole plan (ray.request_resources).

    python benchmarks/autoscaling_start.py [--repeats 2] [--record]

Each try starts a fresh `cluster/local_cluster.sh autoscale` (Ray's autoscaler, fake
multi-node provider, node types of cluster/autoscaling_local.yaml; nothing but the head), submits
the ci-small pipeline (one round, role markers on, planned for that cluster file), and times
from the submit: the first worker node up, every node type up, the first sample stored, the
first optimizer step logged, and the job's end (run folder records: nodes.jsonl,
the store's first shard, train_metrics.jsonl). Then it stops the cluster. Tries alternate
between with and without. Each try appends to benchmarks/results/autoscaling_start.jsonl; a
re-run skips the tries already there (resumable). `--record` appends the table to
benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import machine  # noqa: E402

from dqo_ray.io import append_jsonl, read_jsonl  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "autoscaling_start.jsonl"
CLUSTER_ENV = {"RAY_LOCAL_PORT": "6396", "RAY_LOCAL_DASHBOARD_PORT": "8281",
               "RAY_LOCAL_TMP": "/tmp/ray_asb", "RAY_LOCAL_AGENT_PORT_BASE": "23700",
               "RAY_AUTH_MODE": "disabled"}
MARKS = ("first node", "all node types", "first sample", "first step", "job end")


def _env() -> dict[str, str]:
    env = {**os.environ, **CLUSTER_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    return env


def _cluster(*args: str) -> list[str]:
    return subprocess.run([str(REPO / "cluster" / "local_cluster.sh"), *args], cwd=REPO,
                          env=_env(), check=True, capture_output=True, text=True,
                          timeout=180).stdout.split()


def _ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=_env(),
                          capture_output=True, text=True, timeout=60)


def one_try(request: bool, out: Path) -> dict[str, float]:
    """Seconds from the submit to each of MARKS (a fresh autoscaling cluster)."""
    try:  # (stopped even when it started only in part)
        address = _cluster("autoscale")[-1]
        sets = [f"run.output_dir={out}", f"data.store={out}/store", "pipeline.rounds=1",
                "ray.role_resources=true", f"ray.request_resources={str(request).lower()}",
                f"ray.cluster={REPO / 'cluster' / 'autoscaling_local.yaml'}"]
        submit = [a for s in sets for a in ("--set", s)]
        for _ in range(40):  # the head's job agent comes up a little after `ray start`
            started = time.time()
            # No working_dir: the fake nodes share one session folder (tests/test_autoscaling.py)
            result = _ray("job", "submit", "--address", address, "--submission-id", "bench",
                          "--runtime-env-json", '{"env_vars": {"TOKENIZERS_PARALLELISM": '
                          '"false"}}', "--no-wait", "--", "python", "-m", "jobs.pipeline",
                          "--config", str(REPO / "configs" / "ci-small.yaml"), *submit)
            if "No available agent" not in result.stderr:
                break
            time.sleep(3)
        assert result.returncode == 0, result.stderr
        os.environ["RAY_AUTH_MODE"] = "disabled"  # the loopback test cluster's clients
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
        run, seen = out / "ci-small", {}
        while True:
            now = time.time() - started
            if "first sample" not in seen and list((out / "store").glob("round=0/*.parquet")):
                seen["first sample"] = now
            if "first step" not in seen and (run / "train_metrics.jsonl").exists():
                seen["first step"] = read_jsonl(run / "train_metrics.jsonl")[0]["time"] - started
            status = str(client.get_job_status("bench").value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                assert status == "SUCCEEDED", client.get_job_logs("bench")[-4000:]
                seen["job end"] = time.time() - started
                break
            assert now < 900, f"job not done in 900 s: {status}"
            time.sleep(0.5)
        came = [r for r in read_jsonl(run / "nodes.jsonl") if r["event"] == "came"]
        seen["first node"] = min(r["time"] for r in came) - started
        seen["all node types"] = max(r["time"] for r in came) - started
        return {k: round(seen[k], 1) for k in MARKS}
    finally:
        _cluster("stop")


def table(rows: list[dict]) -> str:
    lines = ["| up-front request | tries | " + " | ".join(MARKS) + " |",
             "| --- | ---: |" + " ---: |" * len(MARKS)]
    for request in (True, False):
        mine = [r for r in rows if r["request"] == request]
        if not mine:
            continue
        cells = [" / ".join(f"{r['seconds'][k]:.1f}" for r in mine)
                 + f" (median {statistics.median(r['seconds'][k] for r in mine):.1f})"
                 for k in MARKS]
        lines.append(f"| {'yes' if request else 'no'} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    done = read_jsonl(RESULTS)
    for i in range(args.repeats):
        for request in (True, False):
            if any(r["try"] == i and r["request"] == request for r in done):
                continue
            out = Path(tempfile.mkdtemp(prefix="dqo-autoscaling-"))
            try:
                seconds = one_try(request, out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            row = {"try": i, "request": request, "seconds": seconds, "time": time.time()}
            append_jsonl(RESULTS, row)
            done.append(row)
            print(json.dumps(row), flush=True)
    text = table(done)
    print(text)
    if args.record:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n## Autoscaling start ({time.strftime('%Y-%m-%d')}, {machine()})\n\n"
                    "`python benchmarks/autoscaling_start.py`: seconds from `ray job submit` "
                    "(ci-small, one round) on a head-only autoscaling cluster "
                    "(cluster/autoscaling_local.yaml), per try.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
