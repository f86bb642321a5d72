"""What a shard of the trajectory store is (`ShardInfo`, its manifest marker's fields) and
where its files go in the store's layout (`dqo_ray.data.store` has the layout and the store
itself). Pure: no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import UTC, datetime

MANIFEST_DIR = "manifest"
QUARANTINE_DIR = "quarantine"
TMP_PREFIX = ".tmp-"
# A name must be one path component, and must not end in ".v<n>": "x.v2" at version 1 would
# share the file name of shard "x" at version 2.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")
VERSION_SUFFIX = re.compile(r"\.v\d+$")
ROUND_DIR = re.compile(r"round=(\d+)")


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard, as recorded in its manifest marker.

    name: unique across the store; round: its generation round; path: its Parquet file,
    relative to the store root; num_rows; has_ref_logprobs: every row has ref_logprobs;
    policy_version: the newest policy version among its rows; created: ISO-8601 UTC time the
    shard was first written; version: 1 at write_shard, +1 per replace_shard; size, sha256:
    the file's byte size and SHA-256 hex digest (None in markers written before they existed).
    """

    name: str
    round: int
    path: str
    num_rows: int
    has_ref_logprobs: bool
    policy_version: int
    created: str
    version: int = 1
    size: int | None = None
    sha256: str | None = None


SHARD_FIELDS = tuple(f.name for f in fields(ShardInfo))


def shard_file(name: str, round: int, version: int) -> str:
    suffix = "" if version == 1 else f".v{version}"
    return f"round={round}/{name}{suffix}.parquet"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
