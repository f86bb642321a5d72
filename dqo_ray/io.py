"""The project's one way to write and read its small local files (pure: no Ray).

- `atomic_write`: readers see the old file or the new one, never a partial one (a temp file
  in the same folder, fsync, rename). Config, run state, trainer state, reports, plots.
- `append_jsonl` / `read_jsonl`: append-only logs (results, metrics, ledger, placement) that
  survive a writer killed mid-line: the next row starts on a fresh line, and the reader
  skips a line that is not a JSON object instead of failing on the whole history.

- `writing` / `DiskFull`: "no space left" while writing becomes one error naming the file
  and what was being written; `disk_full_in` finds it behind Ray's wrappers, so a job ends
  with that line (exit 2) and, once space is freed, resumes.

- `filesystem`: a local path or a URI (`file://`, `s3://`, `gs://`) -> the pyarrow
  filesystem and the path inside it, for what may live in object storage (the trajectory
  store, ingested files, checkpoints to copy).

The trajectory store writes through those filesystems with its own commit protocol
(`dqo_ray.data.store`); checkpoint folders are renamed whole where they are made
(`dqo_ray.train.sft`, `dqo_ray.models.gguf`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path in it) for a local path (made absolute, ~ expanded) or a URI.
    Raises OSError / pyarrow.ArrowException for a URI no filesystem serves."""
    path = os.fspath(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


class DiskFull(OSError):
    """No space left on the file system of `filename` while writing something (named)."""

    def __str__(self) -> str:
        return (f"disk full: no space left for {self.filename} ({self.strerror}); free space "
                "there and run the same command again: it resumes")


def _no_space(exc: BaseException) -> bool:
    # pyarrow raises OSError without errno, its message carrying the C library's words.
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc)


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turns "no space left" while writing `path` (Python's or pyarrow's) into DiskFull."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, pa.ArrowException) as exc:
        if not _no_space(exc):
            raise
        raise DiskFull(errno.ENOSPC, f"while writing {what}", os.fspath(path)) from exc


def disk_full_in(exc: BaseException) -> DiskFull | None:
    """The DiskFull behind `exc`: itself, its causes, a Ray task's cause, a Ray Train worker's
    failure (the trainer's checkpoint writes run in worker processes)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a Ray task's error: the remote exception itself
        if isinstance(e, DiskFull) and not isinstance(cause, BaseException):
            return e  # (Ray's copy is also an instance of DiskFull, without its fields)
        todo += [cause, e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, Mapping):
            todo += list(failures.values())
        todo += list(getattr(e, "exceptions", ()) or ())
    return None


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None],
                 what: str = "a file") -> Path:
    """Writes `data` (bytes, text as UTF-8, or a function writing to a binary file) to `path`
    atomically, creating its folder; returns the path. `what` names it if the disk is full."""
    path = Path(path)
    with writing(path, what):
        return _atomic_write(path, data)


def _atomic_write(path: Path, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Appends one JSON object as a line, durably (one write, flush, fsync).

    A single small `O_APPEND` write lands whole on a local filesystem, so concurrent writers
    do not interleave. If a previous writer died mid-line, the new row starts on a fresh line
    rather than being glued to the fragment (which would lose it too).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(dict(record), default=str) + "\n").encode()
    # "a": every write goes to the end; "+": to peek at its last byte
    with writing(path, "a log record"), open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every JSON-object line of `path` in order ([] when the file does not exist). A line
    that is not one (normally the last, cut short by a crash) is skipped with a warning."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows: list[dict[str, Any]] = []
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            where = "the last line" if number == last else f"line {number}"
            log.warning("%s: skipping %s, not a JSON object (a write cut short?): %.80r",
                        path, where, line)
            continue
        rows.append(row)
    return rows
