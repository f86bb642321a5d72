"""Disk for the plan: what one checkpoint writes to the shared run folder, how much of it the run
folder keeps, and the disk a trainer node needs. Pure: no Ray, no torch. Rough (GB = 1e9
bytes), for refusing what cannot fit, not for tuning.

One checkpoint holds, per trained model (the policy; the value model for dqo and dro, a
backbone plus a scalar head):
- DeepSpeed's state: the weights in the training dtype (2 bytes per parameter in bf16, 4 in
  fp32) and the optimizer's (fp32 master weights and Adam's two moments: 12 bytes in bf16
  mixed precision, 8 in fp32), written once over all ranks (ZeRO shards it);
- an HF export in the training dtype (what the evaluator and a resumed run load).
The run folder keeps trainer.num_to_keep checkpoints of each of the last two rounds. Each rank
writes its part to a scratch folder on its node first, which goes once Ray Train has uploaded
it, so a trainer node needs at most one checkpoint of scratch (all ranks on it, as with
trainer.placement: strict_pack), besides NODE_BASE_GB for the image and the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dqo_ray.clusters import Cluster, Node, format_number
from dqo_ray.model_shapes import ModelShape

if TYPE_CHECKING:
    from dqo_ray.config import Config

GB = 1e9
NODE_BASE_GB = 60.0
"""A GPU node's disk before any checkpoint: the Ray GPU image (~20 GB), the Python environment
with torch, vLLM and DeepSpeed (~15 GB), compiled kernels, logs, Ray's object spilling room."""


@dataclass
class Disk:
    checkpoint_gb: float
    """One checkpoint, written to the shared run folder."""
    kept: int
    """Checkpoints the run folder keeps at most."""
    trainer_node_gb: float
    """What a node that holds the trainer's ranks needs: one checkpoint of scratch + the base."""

    def describe(self) -> str:
        return (f"one checkpoint writes {self.checkpoint_gb:.0f} GB to the run folder (shared "
                f"storage), which keeps up to {self.kept} of them: {self.kept * self.checkpoint_gb:.0f} GB; "
                f"a trainer node needs {self.trainer_node_gb:.0f} GB of disk "
                f"({self.checkpoint_gb:.0f} of scratch while a checkpoint is written, removed "
                f"once uploaded, + {format_number(NODE_BASE_GB)} for the image and environment); "
                f"any other node {format_number(NODE_BASE_GB)} GB (models and data are read from "
                "shared storage)")


def disk_needs(cfg: Config, shape: ModelShape) -> Disk:
    bf16 = cfg.model.dtype != "float32"  # auto = bf16 on a GPU
    per_param = (2 + 12 + 2) if bf16 else (4 + 8 + 4)  # weights, optimizer, HF export
    params = shape.params + (shape.backbone_params if cfg.algo.has_value_model else 0)
    checkpoint = per_param * params / GB
    return Disk(checkpoint, 2 * cfg.trainer.num_to_keep, checkpoint + NODE_BASE_GB)


def check_disk(cfg: Config, cluster: Cluster, shape: ModelShape | None,
               problems: list[str], notes: list[str]) -> Disk | None:
    """The run's disk needs; appends to `problems` each node that could hold the trainer and
    whose disk (known from a cluster file) is smaller than a trainer node needs."""
    if shape is None:
        return None
    disk = disk_needs(cfg, shape)
    small = [n for n in cluster.nodes if _can_train(cfg, n) and n.disk_gb is not None
             and n.disk_gb < disk.trainer_node_gb]
    if small:
        problems.append(
            f"disk: a trainer node needs about {disk.trainer_node_gb:.0f} GB ("
            f"{disk.checkpoint_gb:.0f} GB of checkpoint scratch + {format_number(NODE_BASE_GB)}); "
            f"{small[0].name} has {format_number(small[0].disk_gb)} GB: give its node type a "
            "larger volume")
    elif cfg.trainer.use_gpu and not any(n.disk_gb for n in cluster.nodes):
        notes.append(f"node disks unknown here: give trainer nodes at least "
                     f"{disk.trainer_node_gb:.0f} GB (plan on a cluster file to check it)")
    return disk


def _can_train(cfg: Config, node: Node) -> bool:
    if cfg.ray.role_resources and node.resources and "dqo_trainer" not in node.resources:
        return False
    return node.gpus > 0 if cfg.trainer.use_gpu else node.cpus > 0
