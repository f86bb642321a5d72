"""Starting or joining Ray with settings that make the defaults work on small machines."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dqo_ray.capacity import record_nodes
from dqo_ray.clusters import Ask
from dqo_ray.config import RayConfig
from dqo_ray.io import append_jsonl

log = logging.getLogger(__name__)

# Passed to every Ray worker process: one BLAS thread per process (2 threads per worker on
# 2 cores turned an 11 ms step into 1 s), project-local caches. Never DS_ACCELERATOR: a GPU
# worker would inherit a CPU driver's "cpu"; each process sets its own from what it has
# (`dqo_ray.device`, in `dqo_ray.train.train_engine.import_deepspeed`).
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
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


def init_ray(cfg: RayConfig, engine_log: str | os.PathLike | None = None) -> None:
    """Joins ray.address, or the cluster of a `ray job submit` job (RAY_ADDRESS), or starts a
    local instance. With `engine_log` (a file in the run folder, so on shared storage on a
    cluster), engine chatter goes there and the console keeps the project's own lines
    (`route_engine_logs`)."""
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {"env_vars": dict(WORKER_ENV)}
    if engine_log is not None:
        route_engine_logs(engine_log)
        runtime_env["env_vars"][ENGINE_LOG_ENV] = os.environ[ENGINE_LOG_ENV]
        runtime_env["worker_process_setup_hook"] = "dqo_ray.runtime.worker_log_setup"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        num_cpus = local_num_cpus(cfg)
        log.info("starting a local Ray instance with %d logical CPUs", num_cpus)
        # A run holds ~10 long-lived workers (trainer, engines, evaluator, planner, Ray
        # Data); Ray warns on the console at 4x its startup concurrency, which defaults to
        # the machine's cores (2 on a laptop). A user's own setting wins.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "8")
        # address="local": never join another cluster running on this machine by accident
        # (ray.init's default would, through /tmp/ray/ray_current_cluster).
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env,
                 log_to_driver=True)
    else:
        # A submitted job has its own runtime env (cluster/runtime_env.yaml); ours only adds
        # the worker settings. Its variables are in this process's environment, so WORKER_ENV
        # already carries the job's values where both name a variable.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env)
        # Ray Data keeps one detached stats actor per cluster, on the node of the first process
        # that uses Ray Data. Made here, it lives on the driver's node: on a trainer's node it
        # kept that node busy after the job, so the autoscaler never removed it.
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()


# -- console vs engine log ---------------------------------------------------------------------

ENGINE_LOG = "engines.log"
"""The engine log's name in a run folder."""
ENGINE_LOG_ENV = "DQO_ENGINE_LOG"
OWN_LOGGERS = ("dqo_ray", "actors", "jobs")
"""Loggers whose lines a person reads on the console (progress, results)."""
ENGINE_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "vllm", "deepspeed", "DeepSpeed",
                  "transformers", "torch")
"""Loggers of the engines: named one by one, since Ray Data and others keep handlers of
their own instead of propagating to "ray"."""


def route_engine_logs(path: str | os.PathLike) -> None:
    """In this (driver) process: the engines' loggers write to `path` instead of the console
    and progress bars are off. Ray workers do the same at start (`worker_log_setup`, via the
    runtime env), so vLLM, Ray Train/Data and DeepSpeed chatter lands in the file."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("engine logs (vLLM, Ray, DeepSpeed): %s", path)
    os.environ[ENGINE_LOG_ENV] = str(path)
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    import ray.data  # configures its logger on import: override it after
    import transformers

    ray.data.DataContext.get_current().enable_progress_bars = False
    transformers.utils.logging.disable_progress_bar()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def worker_log_setup() -> None:
    """Ray's worker_process_setup_hook: this worker's stdout and stderr (and so those of the
    engine processes it starts, progress bars and warnings included) go to the engine log;
    the project's own loggers keep Ray's worker log, which Ray forwards to the console."""
    path = os.environ.get(ENGINE_LOG_ENV)
    if not path:
        return
    try:  # a node that cannot write the run folder keeps its output on its console
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        log.warning("engine log %s not writable here (%s): output stays on the console",
                    path, exc)
        return
    console = os.fdopen(os.dup(2), "w", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(console)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


PLACEMENT_FILE = "placement.jsonl"


def record_placement(run_dir: str | os.PathLike, role: str, index: int,
                     where: dict[str, Any] | None = None) -> None:
    """Appends where a piece of work runs (node id, address, pid) to run_dir/placement.jsonl:
    `where` as returned by `node_info()` in that process, or this process's own."""
    append_jsonl(Path(run_dir) / PLACEMENT_FILE,
                 {"role": role, "index": index, **(where or node_info())})


def node_info() -> dict[str, Any]:
    """The Ray node this process runs on."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(), "pid": os.getpid()}


def node_name() -> str:
    """This process's node for messages: host name, and its address inside Ray."""
    import ray

    if not ray.is_initialized():
        return socket.gethostname()
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"


def _probe_sentinel(path: str, token: str, wait_s: float) -> tuple[str, str | None]:
    from dqo_ray.storage import sentinel_problem

    return node_name(), sentinel_problem(path, token, wait_s)


def probe_nodes(path: str, token: str, wait_s: float = 30.0,
                timeout_s: float = 300.0) -> tuple[int, list[tuple[str, str]]]:
    """One task on every alive node reads the sentinel `path` and compares it with `token`;
    returns (nodes probed, [(node, what it saw)] for each node that does not see it or did
    not answer within `timeout_s`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_sentinel)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(path, token, wait_s): n for n in nodes}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    failures = [(f"{refs[r].get('NodeManagerAddress')} ({refs[r]['NodeID'][:12]})",
                 f"no answer within {timeout_s:.0f}s") for r in pending]
    for ref in done:
        try:
            name, problem = ray.get(ref)
        except Exception as exc:  # e.g. the job's runtime env cannot be set up there
            name, problem = refs[ref].get("NodeManagerAddress"), f"the check failed: {exc}"
        if problem:
            failures.append((str(name), problem))
    return len(nodes), failures


def check_run_folder_shared(run_dir: str | os.PathLike, wait_s: float = 30.0,
                            timeout_s: float = 300.0) -> int:
    """Every alive node must see the run folder: the driver writes a sentinel file there and
    one task per node reads it back (`probe_nodes`). Raises RunFolderNotShared naming each node
    that does not; returns the number of nodes checked. Nodes an autoscaler adds later are not
    checked here: their engines and the evaluator name a checkpoint they cannot see."""
    from dqo_ray.storage import not_shared, write_sentinel

    path, token = write_sentinel(run_dir)
    try:
        count, failures = probe_nodes(path, token, wait_s, timeout_s)
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
    if failures:
        raise not_shared(run_dir, failures)
    log.info("run folder %s: visible on all %d node(s)", run_dir, count)
    return count


def running_cluster(gpu_memory_gib: float | None = None):
    """The alive nodes of the Ray cluster this process is connected to, as a
    `dqo_ray.clusters.Cluster` (GPU types from Ray's accelerator_type resources)."""
    import ray

    from dqo_ray.clusters import cluster_from_ray_nodes

    return cluster_from_ray_nodes(ray.nodes(), gpu_memory_gib)


@contextlib.contextmanager
def autoscaler_request(asks: Sequence[Ask], run_dir: str | os.PathLike) -> Iterator[None]:
    """Asks the autoscaler for every bundle of `asks` at once (ray.autoscaler.sdk.
    request_resources), so that node types start in parallel rather than one at a time as
    actors wait for them; withdraws the request on the way out, so idle nodes can go. Recorded
    in run_dir/nodes.jsonl."""
    from ray.autoscaler.sdk import request_resources

    bundles = [a.bundle() for a in asks for _ in range(a.count)]
    what = " + ".join(str(a) for a in asks)
    request_resources(bundles=bundles)
    log.info("asked the autoscaler for the whole run at once: %s", what)
    record_nodes(run_dir, "requested", what=what, bundles=len(bundles))
    try:
        yield
    finally:
        request_resources(bundles=[])
        record_nodes(run_dir, "released")
