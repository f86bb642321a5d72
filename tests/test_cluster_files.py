"""The shipped cluster files can hold what `jobs.plan` asks for (issue 26, item 4): for each GPU
recipe, every phase's bundles are placed (first fit, the plan's own `place`) on the largest
cluster each file lets the autoscaler make: every worker type at its maximum count, with the
CPUs and GPUs the file gives it. Resources only: the files' node types carry no role names
that the plan could check (Ray places roles by resources)."""

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from dqo_ray.clusters import Cluster, Node, place
from dqo_ray.config import load_config
from dqo_ray.plan import phases

RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("gsm8k-*.yaml"))
LAUNCHER_FILES = ["cluster/aws.yaml", "cluster/gcp.yaml"]


def launcher_cluster(path: Path) -> Cluster:
    """Ray cluster launcher: `available_node_types`, each at `max_workers`, their `resources`."""
    spec = yaml.safe_load(path.read_text())
    types = {name: t for name, t in spec["available_node_types"].items()
             if name != spec["head_node_type"]}
    # the types' maxima fit under the cluster's own cap, so all of them can exist at once
    assert sum(t["max_workers"] for t in types.values()) <= spec["max_workers"], path
    return Cluster(str(path), tuple(
        Node(f"{name}-{i}", float(t["resources"].get("CPU", 0)), int(t["resources"].get("GPU", 0)))
        for name, t in types.items() for i in range(t["max_workers"])))


def kuberay_cluster(path: Path) -> Cluster:
    """KubeRay RayCluster: each worker group at `maxReplicas`, its container's limits (Ray
    reads the pod's CPU limit and nvidia.com/gpu; rayStartParams would override them)."""
    spec = yaml.safe_load(path.read_text())
    nodes = []
    for group in spec["spec"]["workerGroupSpecs"]:
        params = group.get("rayStartParams") or {}
        [container] = [c for c in group["template"]["spec"]["containers"]
                       if c["name"] == "ray-worker"]
        limits = container["resources"]["limits"]
        cpus = float(params.get("num-cpus", limits["cpu"]))
        gpus = int(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        nodes += [Node(f"{group['groupName']}-{i}", cpus, gpus)
                  for i in range(group["maxReplicas"])]
    return Cluster(str(path), tuple(nodes))


CLUSTERS = {name: launcher_cluster(REPO / name) for name in LAUNCHER_FILES}
CLUSTERS["cluster/kuberay/raycluster.yaml"] = kuberay_cluster(
    REPO / "cluster" / "kuberay" / "raycluster.yaml")


def test_there_are_recipes_and_the_files_have_gpu_nodes():
    assert len(RECIPES) >= 2
    for name, cluster in CLUSTERS.items():
        assert cluster.gpus >= 16, name  # room for the 2-node recipe's 16 GPUs


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("cluster_file", sorted(CLUSTERS))
def test_every_phase_of_every_recipe_fits_the_cluster_files(recipe, cluster_file):
    cfg = load_config(str(REPO / recipe))
    for phase, asks in phases(cfg).items():
        unplaced = place(CLUSTERS[cluster_file], asks)
        assert unplaced is None, (f"{recipe}, phase {phase}: {cluster_file} has no room for "
                                  f"{unplaced}")
