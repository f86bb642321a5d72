"""Starting or joining Ray with settings that make the defaults work on small machines."""

from __future__ import annotations

import logging
import os

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
    import ray

    if ray.is_initialized():
        return
    if cfg.address is None:
        num_cpus = local_num_cpus(cfg)
        log.info("starting a local Ray instance with %d logical CPUs", num_cpus)
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": WORKER_ENV},
                 log_to_driver=True)
    else:
        log.info("joining Ray cluster at %s", cfg.address)
        ray.init(address=cfg.address, runtime_env={"env_vars": WORKER_ENV})
