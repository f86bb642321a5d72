"""Deterministic epoch order and round mixing (pure; the Ray Data pipeline applies it).

Round weights: a round with weight w = k + f (k integer, 0 <= f < 1) contributes every one of
its trajectories k times per epoch, plus once more for a fraction f of them, chosen by a hash
of (seed, epoch, traj_id) so that a different subset is picked each epoch. Weight 1 = each
trajectory once; 0.5 = a random half; 2 = twice.
The order of an epoch sorts rows by a 63-bit hash of (seed, epoch, traj_id, copy): a uniform
shuffle that depends on nothing but those values, so every worker, every restart and every
machine sees the same order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np


def hash63(*parts: object) -> int:
    """A non-negative 63-bit hash of `parts` (their str), the same in every process and
    machine (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative int64


def copies_per_row(traj_ids: Sequence[str], rounds: Sequence[int],
                   weights: Mapping[int, float], seed: int, epoch: int) -> np.ndarray:
    """Number of times each row appears in this epoch ([N] int64). Missing rounds weigh 1."""
    out = np.empty(len(traj_ids), dtype=np.int64)
    for i, (traj_id, rnd) in enumerate(zip(traj_ids, rounds, strict=True)):
        weight = weights.get(int(rnd), 1.0)
        whole, frac = int(math.floor(weight)), weight - math.floor(weight)
        extra = frac > 0 and hash63("mix", seed, epoch, traj_id) / 2**63 < frac
        out[i] = whole + int(extra)
    return out


def order_keys(traj_ids: Sequence[str], copies: Sequence[int], seed: int,
               epoch: int) -> np.ndarray:
    """Sort key of each (row, copy index) in the epoch order ([N] int64)."""
    return np.fromiter((hash63("order", seed, epoch, t, c)
                        for t, c in zip(traj_ids, copies, strict=True)), dtype=np.int64,
                       count=len(traj_ids))
