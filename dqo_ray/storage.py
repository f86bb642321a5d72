"""Checkpoints every node must see. Pure: no Ray (callers name the node).

On a cluster, run.output_dir (checkpoints, the run folder) and the model folders must be one
path that every node mounts: the generator's engines and the evaluator load checkpoints that
Ray Train wrote on another node. A node that cannot see one gets an error that says so, naming
the path and the node, instead of a raw FileNotFoundError or a silent skip.
"""

from __future__ import annotations

import os

SHARED_STORAGE_HINT = ("every node must see run.output_dir and the model folders at the same "
                       "path: put them on shared storage (NFS, EFS, Filestore, a PVC), see "
                       "cluster/README.md")


class CheckpointNotVisible(FileNotFoundError):
    """A checkpoint folder this node cannot see."""


def not_visible(path: str | os.PathLike, node: str, role: str = "") -> CheckpointNotVisible:
    who = f"{role} on node {node}" if role else f"node {node}"
    return CheckpointNotVisible(f"checkpoint {os.fspath(path)} is not visible to {who}: "
                                f"{SHARED_STORAGE_HINT}")


def require_visible(path: str | os.PathLike, node: str, role: str = "") -> None:
    """Raises CheckpointNotVisible when the local checkpoint folder `path` is not on this node.
    A URI (s3://, gs://, ...) is left to its reader."""
    path = os.fspath(path)
    if "://" in path or os.path.isdir(path):
        return
    raise not_visible(path, node, role)


def removed_by_retention(step: int, existing_steps: list[int]) -> bool:
    """A checkpoint announced at `step` but gone: Ray Train deletes the oldest beyond
    trainer.num_to_keep, so a newer one is there when (and only when) it was removed; with no
    newer one this node does not see the folder Ray Train wrote."""
    return any(s > step for s in existing_steps)
