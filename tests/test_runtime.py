"""Console vs engine log: what a Ray worker prints lands in the engine log, the project's own
log lines stay on the worker's console stream (which Ray forwards to the driver)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from dqo_ray.runtime import ENGINE_LOG_ENV

WORKER = """
import logging, os, subprocess, sys, warnings
from dqo_ray.runtime import worker_log_setup
worker_log_setup()
print("engine chatter on stdout", flush=True)
warnings.warn("a library warning")
subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child process line\\\\n')"])
logging.getLogger("vllm").warning("vllm says hello")
logging.getLogger("dqo_ray.train").info("step 10/60 loss 0.2")
logging.getLogger("actors.evaluator").info("evaluated step 60")
"""


def test_worker_output_goes_to_the_engine_log_and_own_lines_to_the_console(tmp_path):
    log_file = tmp_path / "run" / "engines.log"
    log_file.parent.mkdir()
    env = {**os.environ, ENGINE_LOG_ENV: str(log_file), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    console = out.stdout + out.stderr
    engine = log_file.read_text()
    for line in ("engine chatter on stdout", "a library warning", "child process line",
                 "vllm says hello"):
        assert line in engine and line not in console
    for line in ("step 10/60 loss 0.2", "evaluated step 60"):
        assert line in console and line not in engine


def test_without_an_engine_log_the_hook_changes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ENGINE_LOG_ENV}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert "engine chatter on stdout" in out.stdout and "child process line" in out.stderr


DRIVER = """
import logging, sys
import ray
from dqo_ray.runtime import route_engine_logs
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
route_engine_logs(sys.argv[1])
ray.init(address=sys.argv[2], log_to_driver=False)
rows = ray.data.range(64).map_batches(lambda b: b).sort("id").take_all()
logging.getLogger("jobs.pipeline").info("round 0 data: %d rows", len(rows))
"""


@pytest.mark.ray
def test_driver_keeps_its_own_lines_and_sends_ray_data_progress_to_the_engine_log(
        tmp_path, ray_address):
    log_file = tmp_path / "engines.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", DRIVER, str(log_file), ray_address], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    console = out.stdout + out.stderr
    assert "jobs.pipeline: round 0 data: 64 rows" in console
    assert "ray.data" not in console and "Dataset" not in console, console
    assert "Dataset" in log_file.read_text()
