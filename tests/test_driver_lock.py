"""One driver per run folder (issue 26, item 7): a second driver is refused with who holds the
folder; a lock whose driver died is taken over; a driver whose lock was taken stops. Real
processes, real files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

from dqo_ray.driver_lock import LOCK_FILE, DriverLock, RunFolderBusy

HOLD = """
import sys, time
from dqo_ray.driver_lock import DriverLock
with DriverLock(sys.argv[1], heartbeat_s=0.2, stale_after_s=5):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(run_dir, env=None):
    """A live process holding `run_dir`'s lock (as a driver would)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO),
                                                         **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_is_refused_with_who_holds_the_folder(tmp_path):
    job = json.dumps({"metadata": {"job_submission_id": "raysubmit_abc123"}})
    proc = _holder(tmp_path, {"RAY_JOB_CONFIG_JSON_ENV_VAR": job})
    try:
        with pytest.raises(RunFolderBusy) as info:
            DriverLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message
        assert "job raysubmit_abc123" in message and "since 20" in message
        assert str(tmp_path / LOCK_FILE) in message
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_driver_is_taken_over_at_once(tmp_path, caplog):
    proc = _holder(tmp_path)
    proc.kill()  # no release: the lock file stays
    proc.wait()
    assert (tmp_path / LOCK_FILE).exists()
    with DriverLock(tmp_path) as lock:
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["token"] == lock.holder["token"]
    assert f"pid {proc.pid} on this host) is no longer running" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left


def test_a_lock_from_another_host_waits_until_it_is_stale(tmp_path):
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"host": "node-7", "pid": 4242, "job": None,
                                     "since": "2026-12-03 10:00:00 UTC", "token": "x"}))
    with pytest.raises(RunFolderBusy, match="pid 4242 on node-7, since 2026-12-03"):
        DriverLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 61
    os.utime(lock_file, (old, old))  # its driver stopped refreshing it 61 s ago
    lock = DriverLock(tmp_path, stale_after_s=60)
    lock.acquire()
    assert json.loads(lock_file.read_text())["token"] == lock.holder["token"]
    lock.release()


def test_a_holder_refreshes_its_lock_and_stops_when_it_is_taken(tmp_path):
    lost = []
    lock = DriverLock(tmp_path, heartbeat_s=0.1, stale_after_s=1, on_lost=lambda: lost.append(1))
    lock.acquire()
    lock_file = tmp_path / LOCK_FILE
    old = time.time() - 30
    os.utime(lock_file, (old, old))
    deadline = time.monotonic() + 60
    while time.time() - lock_file.stat().st_mtime > 5:  # the heartbeat refreshes it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Another driver took it (as after this one stalled past stale_after_s).
    taken = dict(lock.holder, pid=1, token="other")
    lock_file.write_text(json.dumps(taken))
    while not lost:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert lock.lost
    lock.release()
    assert json.loads(lock_file.read_text())["token"] == "other"  # not ours to remove


def test_the_pipeline_refuses_a_second_driver_before_starting_ray(tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    proc = _holder(run_dir)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "jobs.pipeline", "--config", "configs/demo.yaml",
             "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.name=busy"],
            cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{run_dir} is in use by another driver: pid {proc.pid}")
    assert "starting a local Ray instance" not in out.stderr
    assert not (run_dir / "pipeline_state.json").exists()
