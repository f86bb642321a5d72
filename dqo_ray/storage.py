"""Checkpoints every node must see. Pure: no Ray (callers name the node).

On a cluster, run.output_dir (checkpoints, the run folder) and the model folders must be one
path that every node mounts: the generator's engines and the evaluator load checkpoints that
Ray Train wrote on another node. A node that cannot see one gets an error that says so, naming
the path and the node, instead of a raw FileNotFoundError or a silent skip.
"""

from __future__ import annotations

import os
import time
import uuid

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


# -- the run folder at start: does every node see it? ---------------------------------------------

SENTINEL_PREFIX = ".node-check-"


class RunFolderNotShared(RuntimeError):
    """Some node does not see the run folder the driver wrote (its message names them)."""


def write_sentinel(run_dir: str | os.PathLike) -> tuple[str, str]:
    """Writes run_dir/.node-check-<token> holding the token; returns (path, token). Each node
    then reads it back (`sentinel_problem`): a node that does not mount the same storage at
    the same path does not find it, or finds another file."""
    token = uuid.uuid4().hex
    folder = os.path.abspath(os.fspath(run_dir))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SENTINEL_PREFIX + token)
    with open(path, "w") as f:
        f.write(token)
    return path, token


def sentinel_problem(path: str, token: str, wait_s: float = 30.0,
                     poll_s: float = 1.0) -> str | None:
    """None when this node sees the sentinel `path` holding `token`; else what it sees. Looked
    for again for `wait_s` (a shared file system may show a new file late)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as f:
                seen = f.read().strip()
            if seen == token:
                return None
            problem = f"{path} holds something else (another storage mounted at that path?)"
        except FileNotFoundError:
            folder = os.path.dirname(path)
            problem = (f"{path} is not there" if os.path.isdir(folder) else
                       f"the folder {folder} does not exist here")
        except OSError as exc:
            problem = f"{path} cannot be read ({exc})"
        if time.monotonic() >= deadline:
            return problem
        time.sleep(poll_s)


def not_shared(run_dir: str | os.PathLike, failures: list[tuple[str, str]]) -> RunFolderNotShared:
    """failures: (node, what it saw)."""
    nodes = "; ".join(f"node {node}: {problem}" for node, problem in failures)
    return RunFolderNotShared(f"run folder {os.fspath(run_dir)} is not visible on every node "
                              f"({nodes}): {SHARED_STORAGE_HINT}")
