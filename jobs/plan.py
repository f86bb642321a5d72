"""The run's plan before anything starts: resources per role, GPU memory, and whether it fits.

    python -m jobs.plan --config FILE [--set key=value ...] [--cluster 2x8xH100-80GB|auto]

--cluster NODESxGPUSxTYPE[-MEMGB][:CPUScpu] describes identical nodes (CPUs default to 12 per
GPU); `auto` reads the nodes of the running Ray cluster (ray.address, else RAY_ADDRESS, else
the local one); without it, ray.cluster from the config. Prints the plan (dqo_ray.plan);
exits 0 when it fits, 2 with one `plan refused: ...` line per problem when it does not (the
pipeline refuses the same run at start with the same lines).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dqo_ray.clusters import Cluster, PlanError, parse_cluster
from dqo_ray.config import Config, ConfigError, add_config_args, config_from_args
from dqo_ray.model_shapes import model_shape
from dqo_ray.plan import Plan, make_plan


def plan_for(cfg: Config, cluster: Cluster) -> Plan:
    return make_plan(cfg, cluster, model_shape(cfg.model))


def join_running_cluster(cfg: Config, gpu_memory_gb: float | None = None) -> Cluster:
    """The running Ray cluster's alive nodes (joins it; never starts one)."""
    import ray

    from dqo_ray.runtime import running_cluster

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or os.environ.get("RAY_ADDRESS") or "auto",
                 logging_level=logging.ERROR)
    return running_cluster(gpu_memory_gb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--cluster", help="NODESxGPUSxTYPE[-MEMGB][:CPUScpu], e.g. "
                        "2x8xH100-80GB; an autoscaling cluster's file (cluster/aws.yaml, "
                        "cluster/kuberay/raycluster.yaml: the largest cluster it can grow to); "
                        "or auto (the running Ray cluster); default ray.cluster")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="with --cluster auto: memory per GPU, for GPU types Ray names but "
                        "this tool does not know")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        spec = args.cluster or cfg.ray.cluster
        if spec is None:
            raise PlanError("no cluster to plan for: give --cluster (e.g. 2x8xH100-80GB, or "
                            "auto) or set ray.cluster")
        cluster = join_running_cluster(cfg, args.gpu_memory_gb) if spec == "auto" else \
            parse_cluster(spec)
    except (ConfigError, PlanError) as exc:
        print(f"jobs.plan: {exc}", file=sys.stderr)
        return 2
    plan = plan_for(cfg, cluster)
    print(plan.render(args.config or "defaults"))
    if not plan.ok:  # the refusal lines on stderr, as the pipeline prints them
        print(plan.refusal(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
