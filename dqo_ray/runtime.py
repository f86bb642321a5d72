"""Starting or joining Ray with settings that make the defaults work on small machines."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from dqo_ray.config import RayConfig

log = logging.getLogger(__name__)

# Passed to every Ray worker process: one BLAS thread per process (2 threads per worker on
# 2 cores turned an 11 ms step into 1 s), DeepSpeed's CPU accelerator, project-local caches.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
}
for _key in ("TORCH_EXTENSIONS_DIR", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR",
             "RAY_DATA_DISABLE_PROGRESS_BARS", "VLLM_ENABLE_V1_MULTIPROCESSING",
             "VLLM_CPU_OMP_THREADS_BIND"):
    if _key in os.environ:
        WORKER_ENV[_key] = os.environ[_key]


def local_num_cpus(cfg: RayConfig) -> int:
    """Logical CPUs for a local instance. Ray Data read/map tasks each need one whole free CPU
    beside the training workers, or the pipeline is backpressured forever on 2-core machines;
    so a local instance advertises at least 4."""
    return cfg.num_cpus or max(4, os.cpu_count() or 1)


def init_ray(cfg: RayConfig) -> None:
    """Joins ray.address, or the cluster of a `ray job submit` job (RAY_ADDRESS), or starts a
    local instance."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        num_cpus = local_num_cpus(cfg)
        log.info("starting a local Ray instance with %d logical CPUs", num_cpus)
        # address="local": never join another cluster running on this machine by accident
        # (ray.init's default would, through /tmp/ray/ray_current_cluster).
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": WORKER_ENV},
                 log_to_driver=True)
    else:
        # A submitted job has its own runtime env (cluster/runtime_env.yaml); ours only adds
        # the worker settings. Its variables are in this process's environment, so WORKER_ENV
        # already carries the job's values where both name a variable.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV})


PLACEMENT_FILE = "placement.jsonl"


def record_placement(run_dir: str | os.PathLike, role: str, index: int,
                     where: dict[str, Any] | None = None) -> None:
    """Appends where a piece of work runs (node id, address, pid) to run_dir/placement.jsonl:
    `where` as returned by `node_info()` in that process, or this process's own."""
    row = {"role": role, "index": index, **(where or node_info())}
    path = Path(run_dir) / PLACEMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short line per O_APPEND write: lines never interleave
        f.write(json.dumps(row) + "\n")


def node_info() -> dict[str, Any]:
    """The Ray node this process runs on."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(), "pid": os.getpid()}
