"""Clusters for the plan: GPU kinds (datasheet memory and peak), nodes, a cluster written as
NODESxGPUSxTYPE[-MEMGB][:CPUScpu], read from an autoscaling cluster's file (Ray cluster
launcher or KubeRay: the largest cluster it lets the autoscaler make) or from `ray.nodes()`,
and what a role asks of it (`Ask`) placed first-fit (`place`). Pure: no Ray, no config;
`dqo_ray.config` checks ray.cluster with `parse_cluster`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class PlanError(ValueError):
    """A cluster description that cannot be read (the message names it)."""


@dataclass(frozen=True)
class GPUKind:
    name: str
    memory_gib: float
    bf16_tflops: float
    """Dense bf16 tensor-core peak (datasheet), for MFU."""


# Datasheet numbers (SXM parts where there are two). A100 without a memory suffix is the 40 GB
# part (AWS p4d, GCP a2-highgpu): the smaller one, so a plan never counts on memory it lacks.
GPU_KINDS: dict[str, GPUKind] = {k.name: k for k in (
    GPUKind("H100", 80, 989), GPUKind("H200", 141, 989), GPUKind("B200", 180, 2250),
    GPUKind("A100", 40, 312), GPUKind("L40S", 48, 362), GPUKind("L4", 24, 121),
    GPUKind("A10G", 24, 70),
)}

DEFAULT_CPUS_PER_GPU = 12
"""CPUs a described GPU node is assumed to have per GPU when the description does not say
(p4d: 96 for 8 GPUs; p5 and a3 have more)."""


def gpu_kind(name: str, memory_gib: float | None = None) -> GPUKind:
    """"H100", "H100-80GB", "A100-80G" (Ray's accelerator type names), "l4" -> a GPUKind; an
    unknown name is kept with the memory given (0 = unknown: memory is then not estimated)."""
    match = re.fullmatch(r"([A-Za-z0-9]+?)(?:[-_](\d+(?:\.\d+)?)G(?:B|IB)?)?", name.strip(),
                         re.IGNORECASE)
    if not match:
        raise PlanError(f"GPU type {name!r} is not a name such as H100 or A100-80GB")
    base, size = match.group(1).upper(), match.group(2)
    known = GPU_KINDS.get(base)
    memory = memory_gib or (float(size) if size else (known.memory_gib if known else 0.0))
    return GPUKind(base, memory, known.bf16_tflops if known else 0.0)


ROLE_RESOURCES = {"trainer": "dqo_trainer", "generator": "dqo_generator",
                  "evaluator": "dqo_evaluator"}
"""The custom Ray resource each role asks one unit of per worker / engine / actor when
ray.role_resources is on; an autoscaling cluster's node types declare them (cluster/aws.yaml:
`dqo_trainer: 8` on the 8-GPU training type), so the autoscaler starts, for each role, the
node type meant for it."""


@dataclass(frozen=True)
class Node:
    name: str
    cpus: float
    gpus: int
    gpu: GPUKind | None = None
    resources: Mapping[str, float] = field(default_factory=dict, compare=False)
    """Custom resources (ROLE_RESOURCES among them)."""
    disk_gb: float | None = None
    """Its disk, where a cluster file says (a launcher's volume size, a pod's ephemeral
    storage); None = unknown."""


@dataclass(frozen=True)
class Cluster:
    label: str
    nodes: tuple[Node, ...]
    knows_resources: bool = False
    """Whether the nodes' custom resources are known (a cluster file, the running cluster);
    a NODESxGPUSxTYPE description says nothing of them, so asks for them are not checked."""

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    def describe(self) -> str:
        kinds = sorted({f"{n.gpu.name} {format_number(n.gpu.memory_gib)} GiB" for n in self.nodes
                        if n.gpu and n.gpus})
        return (f"{self.label}: {len(self.nodes)} node(s), {self.gpus} GPUs"
                f"{' (' + ', '.join(kinds) + ')' if kinds else ''}, "
                f"{format_number(self.cpus)} CPUs")


CLUSTER_SPEC = re.compile(r"(\d+)x(\d+)x([A-Za-z0-9.\-_]+?)(?::(\d+)cpus?)?", re.IGNORECASE)


def parse_cluster(spec: str) -> Cluster:
    """NODESxGPUSxTYPE[-MEMGB][:CPUScpu], e.g. 2x8xH100, 2x8xH100-80GB, 1x8xA100-40GB:96cpu:
    identical nodes; CPUs default to DEFAULT_CPUS_PER_GPU per GPU. Or a cluster file (.yaml):
    `cluster_from_file`."""
    if spec.strip().endswith((".yaml", ".yml")):
        return cluster_from_file(Path(spec.strip()))
    match = CLUSTER_SPEC.fullmatch(spec.strip())
    if not match:
        raise PlanError(f"{spec!r} is not a cluster NODESxGPUSxTYPE[-MEMGB][:CPUScpu] such as "
                        "2x8xH100-80GB")
    nodes, gpus, kind, cpus = match.groups()
    if int(nodes) < 1 or int(gpus) < 1:
        raise PlanError(f"{spec!r}: needs at least one node and one GPU per node")
    gpu = gpu_kind(kind)
    if not gpu.memory_gib:
        raise PlanError(f"{spec!r}: GPU type {gpu.name} has no known memory size; say it, "
                        f"e.g. {gpu.name}-80GB")
    node_cpus = float(cpus) if cpus else float(DEFAULT_CPUS_PER_GPU * int(gpus))
    return Cluster(spec.strip(), tuple(Node(f"node{i}", node_cpus, int(gpus), gpu)
                                       for i in range(int(nodes))))


def _node(name: str, resources: Mapping[str, Any], gpu_memory_gib: float | None = None,
          disk_gb: float | None = None) -> Node:
    """A node from Ray resources: CPU, GPU, `accelerator_type:<name>` (its GPU kind) and the
    custom rest."""
    gpus = int(float(resources.get("GPU", 0)))
    kinds = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
    gpu = gpu_kind(kinds[0], gpu_memory_gib) if kinds else (
        GPUKind("GPU", gpu_memory_gib or 0.0, 0.0) if gpus else None)
    custom = {k: float(v) for k, v in resources.items()
              if k not in ("CPU", "GPU", "memory", "object_store_memory")
              and not k.startswith(("accelerator_type:", "node:"))}
    return Node(name, float(resources.get("CPU", 0)), gpus, gpu, custom, disk_gb)


def cluster_from_file(path: Path) -> Cluster:
    """The largest cluster an autoscaling cluster's file lets the autoscaler make: every
    worker type at its maximum count, with the resources the file gives it. A Ray cluster
    launcher file (`available_node_types`, each type's `resources`), or a KubeRay RayCluster /
    RayJob (each worker group at `maxReplicas`: its container's CPU and nvidia.com/gpu limits,
    overridden by rayStartParams num-cpus / num-gpus / resources, as Ray reads them). A GPU's
    kind comes from an `accelerator_type:<name>` resource."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PlanError(f"ray.cluster {path}: cannot read it as a cluster file ({exc})") from None
    if isinstance(spec, dict) and "available_node_types" in spec:
        types = [(name, t["max_workers"], t.get("resources") or {},
                  _launcher_disk(t.get("node_config") or {}))
                 for name, t in spec["available_node_types"].items()
                 if name != spec.get("head_node_type")]
    elif isinstance(spec, dict) and spec.get("kind") in ("RayCluster", "RayJob"):
        body = spec["spec"] if spec["kind"] == "RayCluster" else spec["spec"]["rayClusterSpec"]
        types = [(g["groupName"], g["maxReplicas"], *_kuberay_resources(g))
                 for g in body["workerGroupSpecs"]]
    else:
        raise PlanError(f"ray.cluster {path}: neither a Ray cluster launcher file "
                        "(available_node_types) nor a KubeRay RayCluster / RayJob")
    nodes = tuple(_node(f"{name}-{i}", resources, disk_gb=disk)
                  for name, count, resources, disk in types for i in range(int(count)))
    return Cluster(str(path), nodes, knows_resources=True)


def _launcher_disk(node_config: Mapping[str, Any]) -> float | None:
    """The boot volume's size: AWS BlockDeviceMappings' Ebs.VolumeSize, GCP disks'
    initializeParams.diskSizeGb (GiB, counted as GB: rough either way)."""
    for mapping in node_config.get("BlockDeviceMappings") or []:
        if "VolumeSize" in (mapping.get("Ebs") or {}):
            return float(mapping["Ebs"]["VolumeSize"])
    for disk in node_config.get("disks") or []:
        if disk.get("boot") and "diskSizeGb" in (disk.get("initializeParams") or {}):
            return float(disk["initializeParams"]["diskSizeGb"])
    return None


def _kuberay_resources(group: Mapping[str, Any]) -> tuple[dict[str, Any], float | None]:
    """A worker group's Ray resources, and its pod's ephemeral storage (GB) where it says."""
    params = group.get("rayStartParams") or {}
    [container] = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
    limits = container.get("resources", {}).get("limits", {})
    out: dict[str, Any] = {"CPU": params.get("num-cpus", limits.get("cpu", 0)),
                           "GPU": params.get("num-gpus", limits.get("nvidia.com/gpu", 0))}
    if "resources" in params:  # KubeRay's form: a JSON object inside a quoted string
        out.update(json.loads(str(params["resources"]).strip().strip('"').replace('\\"', '"')))
    storage = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|G)", str(limits.get("ephemeral-storage", "")))
    return out, float(storage[1]) if storage else None


RUNNING = "the running Ray cluster"


def cluster_from_ray_nodes(nodes: Iterable[Mapping[str, Any]],
                           gpu_memory_gib: float | None = None) -> Cluster:
    """The alive nodes of `ray.nodes()` as a Cluster. A node's GPU type is Ray's
    `accelerator_type:<name>` resource; its memory comes from GPU_KINDS (or `gpu_memory_gib`)."""
    # The ID's tail: unique for Ray's random IDs and for the fake provider's counted ones.
    out = [_node(f"{node.get('NodeManagerAddress', '?')} ({str(node.get('NodeID', '?'))[-12:]})",
                 node.get("Resources", {}), gpu_memory_gib)
           for node in nodes if node.get("Alive", node.get("alive", True))]
    return Cluster(RUNNING, tuple(out), knows_resources=True)


# -- what a role asks for, placed on a cluster ----------------------------------------------


@dataclass(frozen=True)
class Ask:
    """`count` units of one role, each needing `gpus` GPUs (on one node), `cpus` CPUs and, when
    `resource` is set, one of that custom resource (ROLE_RESOURCES)."""

    role: str
    count: int
    gpus: int
    cpus: float
    what: str = ""
    resource: str = ""
    one_node: bool = False
    """All `count` units on the same node (trainer.placement: strict_pack)."""

    def unit(self) -> str:
        parts = [f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}"] if self.gpus else []
        parts.append(f"{format_number(self.cpus)} CPU{'s' if self.cpus != 1 else ''}")
        if self.resource:
            parts.append(f"1 {self.resource}")
        return ", ".join(parts)

    def bundle(self) -> dict[str, float]:
        """One unit as a Ray resource bundle (what the autoscaler is asked for)."""
        out = {"CPU": float(self.cpus)}
        if self.gpus:
            out["GPU"] = float(self.gpus)
        if self.resource:
            out[self.resource] = 1.0
        return out

    def __str__(self) -> str:
        return f"{self.role} {self.count} x ({self.unit()})"


def place(cluster: Cluster, asks: Sequence[Ask]) -> str | None:
    """None when every unit of `asks` fits on the cluster at once, else the one that does not
    (named by role): `assign`'s verdict."""
    return assign(cluster, asks)[1]


def assign(cluster: Cluster, asks: Sequence[Ask]) -> tuple[list[list[str]], str | None]:
    """First-fit decreasing of every unit onto the nodes (a unit's GPUs, CPUs and role marker on
    one node; a `one_node` ask's units all on the same node): the roles placed on each node, in
    node order, and None, or the unit that does not fit. CPU-only units go to nodes without GPUs
    first, as Ray's scheduler prefers."""
    # By position: several Ray nodes may share a machine (and so an address).
    free = [{"GPU": n.gpus, "CPU": n.cpus, **n.resources} for n in cluster.nodes]
    placed: list[list[str]] = [[] for _ in cluster.nodes]
    units: list[tuple[Ask, int | None, int]] = []  # (ask, index | None = all, units at once)
    for a in asks:
        units += [(a, None, a.count)] if a.one_node else [(a, i, 1) for i in range(a.count)]
    units.sort(key=lambda u: (-u[0].gpus * u[2], -u[0].cpus * u[2]))  # stable: role order
    for ask, i, n in units:
        one = ask.bundle() if cluster.knows_resources else {"GPU": ask.gpus, "CPU": ask.cpus}
        need = {key: amount * n for key, amount in one.items()}
        order = range(len(cluster.nodes))
        if not ask.gpus:
            order = sorted(order, key=lambda k: cluster.nodes[k].gpus > 0)
        for k in order:
            if all(free[k].get(key, 0) >= amount - 1e-9 for key, amount in need.items()):
                for key, amount in need.items():
                    free[k][key] -= amount
                placed[k].append(ask.role if i is not None else f"{ask.role} x{ask.count}")
                break
        else:
            what = (f"{ask.role} {i + 1} of {ask.count} ({ask.unit()})" if i is not None else
                    f"{ask.role}: all {ask.count} x ({ask.unit()}) on one node")
            return placed, what
    return placed, None


def format_number(x: float) -> str:
    """12.0 -> "12", 0.5 -> "0.5" (counts of CPUs and GiB in messages)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
