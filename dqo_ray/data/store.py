"""The trajectory store: Parquet shards per round plus a manifest of commit markers.

The store is the only hand-off between stages (generation, reference scoring, training), so
it must never show a half-written shard, on a local disk or on an object store. Layout:

    <root>/round=<k>/<name>.parquet          data of shard <name>, version 1
    <root>/round=<k>/<name>.v<n>.parquet     version n >= 2 (rewritten by replace_shard)
    <root>/manifest/<name>.json              commit marker = the ShardInfo of the live version
    <root>/quarantine/...                    damaged shards moved aside by `quarantine`

A shard is visible only through its marker, and the marker is written last: a crash before it
leaves an orphan Parquet file that no reader sees and `gc()` deletes later. Each file write is
itself atomic: on a local filesystem it goes to `.tmp-<uuid>-<name>` in the same folder and is
renamed into place (rename is atomic within a filesystem); on object stores (S3, GCS) a single
PUT is atomic, so the object is written under its final name directly.

Each marker records its file's byte size and SHA-256, so a file damaged after the commit
(a truncated copy, flipped bytes) is found before anything trains on it: `check` raises an
error naming the shard, `verify` lists every damaged shard, and `quarantine` moves one aside
(never deletes) so the rest of the store stays usable.

Shard names are unique across rounds (the manifest is flat). Readers get paths in the
filesystem's namespace (`paths`, with `filesystem`) or full URIs (`uri`), e.g. for
`ray.data.read_parquet(store.paths(shards), filesystem=store.filesystem, partitioning=None)`.
The `round=<k>` folders look like Hive partitions; the `round` column is in every file (int32),
so `partitioning=None` keeps any reader from deriving a second, string-typed copy of it
(Ray 2.60 happens to keep the file's column either way). Readers must only open files listed
by the manifest, never glob the folders: those may hold orphans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from numbers import Integral

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dqo_ray.data import shards as layout
from dqo_ray.data.schema import (
    COLUMNS,
    TRAJECTORY_SCHEMA,
    RowError,
    StoreError,
    format_errors,
    unchecked_rows_to_table,
    validate_rows,
    validate_table,
)
from dqo_ray.data.shards import ShardInfo
from dqo_ray.io import filesystem, is_uri, writing

__all__ = ["ShardInfo", "StoreError", "TrajectoryStore"]

log = logging.getLogger(__name__)

class TrajectoryStore:
    """Atomic Parquet shards of trajectories under `root` (local path or filesystem URI).

    `root` is a local path (relative paths are made absolute) or a pyarrow filesystem URI:
    `file:///abs/path`, `s3://bucket/prefix`, `gs://bucket/prefix`. Nothing is created until
    the first write.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = os.fspath(root)
        try:
            self._fs, path = filesystem(root)
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(f"cannot open store {root!r}: {exc}") from exc
        self._scheme: str | None = root.split("://", 1)[0] if is_uri(root) else None
        self._root = path.rstrip("/") or "/"
        self._local = self._fs.type_name == "local"
        self.root = root

    def __repr__(self) -> str:
        return f"TrajectoryStore({self.root!r})"

    # ---------------------------------------------------------------- paths

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem that `paths()` are relative to."""
        return self._fs

    def _abs(self, relative: str) -> str:
        return f"{self._root}/{relative}"

    def paths(self, shards: Iterable[ShardInfo]) -> list[str]:
        """The shards' Parquet files as paths in `filesystem`'s namespace."""
        return [self._abs(s.path) for s in shards]

    def uri(self, shard: ShardInfo) -> str:
        """The shard's Parquet file as a full URI (or an absolute path for a local store)."""
        path = self._abs(shard.path)
        return f"{self._scheme}://{path}" if self._scheme else path

    # ---------------------------------------------------------------- low-level writes

    def _write_bytes_atomic(self, relative: str, write) -> None:
        """Writes a file via `write(stream)` so that it appears complete or not at all."""
        target = self._abs(relative)
        with writing(target, "the trajectory store"):
            self._write_file(target, write)

    def _write_file(self, target: str, write) -> None:
        folder, base = target.rsplit("/", 1)
        if not self._local:
            # A single PUT on an object store is atomic: readers see the old object or the new.
            # (A write that fails half way may still be completed by the stream's close() as a
            # truncated object; for data files that is an invisible orphan, and markers are
            # one small write.)
            with self._fs.open_output_stream(target) as out:
                write(out)
            return
        self._fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/{layout.TMP_PREFIX}{uuid.uuid4().hex}-{base}"
        try:
            with self._fs.open_output_stream(tmp) as out:
                write(out)
            self._fs.move(tmp, target)  # rename(2): atomic, replaces an existing target
        except BaseException:
            try:
                self._fs.delete_file(tmp)
            except (OSError, pa.ArrowException):
                pass  # gc() removes it later
            raise

    def _write_parquet(self, relative: str, table: pa.Table) -> tuple[int, str]:
        """Writes the table; returns the file's (byte size, SHA-256) for its marker."""
        sink = pa.BufferOutputStream()
        # zstd: smaller files than the default snappy for id/log-prob lists, similar read speed.
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        self._write_bytes_atomic(relative, lambda out: out.write(data))
        return data.size, hashlib.sha256(data).hexdigest()

    def _write_marker(self, info: ShardInfo) -> None:
        data = (json.dumps(asdict(info), indent=1) + "\n").encode()
        self._write_bytes_atomic(f"{layout.MANIFEST_DIR}/{info.name}.json", lambda out: out.write(data))

    def _delete(self, relative: str) -> None:
        try:
            self._fs.delete_file(self._abs(relative))
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------- manifest

    def _marker_infos(self) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._abs(layout.MANIFEST_DIR), allow_not_found=True)
        return [f for f in self._fs.get_file_info(selector)
                if f.type == pafs.FileType.File and f.base_name.endswith(".json")
                and not f.base_name.startswith(".")]

    def _read_marker(self, path: str) -> ShardInfo:
        try:
            with self._fs.open_input_stream(path) as f:
                raw = json.loads(f.read())
            # Unknown keys are ignored so markers written by a newer version stay readable.
            info = ShardInfo(**{k: raw[k] for k in layout.SHARD_FIELDS if k in raw})
        except FileNotFoundError as exc:
            raise StoreError(f"manifest marker {path} vanished while reading") from exc
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"manifest marker {path} is unreadable: {exc}") from exc
        if f"{info.name}.json" != path.rsplit("/", 1)[-1]:
            raise StoreError(f"manifest marker {path} names shard {info.name!r}")
        return info

    def _marker(self, name: str) -> ShardInfo | None:
        path = self._abs(f"{layout.MANIFEST_DIR}/{name}.json")
        if self._fs.get_file_info(path).type != pafs.FileType.File:
            return None
        return self._read_marker(path)

    def shards(self, rounds: Iterable[int] | None = None) -> list[ShardInfo]:
        """Committed shards (of the given rounds, or all), sorted by (round, name)."""
        wanted = None if rounds is None else set(rounds)
        infos = [self._read_marker(f.path) for f in self._marker_infos()]
        return sorted((s for s in infos if wanted is None or s.round in wanted),
                      key=lambda s: (s.round, s.name))

    def rounds(self) -> list[int]:
        """Rounds that have at least one committed shard, ascending."""
        return sorted({s.round for s in self.shards()})

    def num_rows(self, rounds: Iterable[int] | None = None) -> int:
        """Total rows in the committed shards of the given rounds (all when None)."""
        return sum(s.num_rows for s in self.shards(rounds))

    # ---------------------------------------------------------------- writes

    def _prepare(self, data: list[dict] | pa.Table, round: int, source: str) -> pa.Table:
        """Validates rows or a table and returns it cast to TRAJECTORY_SCHEMA."""
        if isinstance(data, pa.Table):
            missing = [c for c in COLUMNS if c not in data.column_names]
            extra = [c for c in data.column_names if c not in COLUMNS]
            if missing or extra:
                raise StoreError(f"{source}: table columns do not match the trajectory schema "
                                 f"(missing: {missing or 'none'}; unexpected: {extra or 'none'})")
            try:
                table = data.select(list(COLUMNS)).cast(TRAJECTORY_SCHEMA)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                raise StoreError(f"{source}: cannot cast to the trajectory schema: {exc}") \
                    from exc
            errors = validate_table(table, source)
            rounds = table.column("round").to_numpy(zero_copy_only=False)
            traj_ids = table.column("traj_id")
        else:
            table = None
            errors = validate_rows(data, source)
            rounds = [row.get("round") for row in data]
            traj_ids = [row.get("traj_id") for row in data]
        if not len(rounds):
            raise StoreError(f"{source}: no rows (an empty shard is never written)")
        for i, value in enumerate(rounds):
            # nulls and non-integers are already reported by the validators
            if isinstance(value, Integral) and not isinstance(value, bool) and value != round:
                traj_id = traj_ids[i]
                traj_id = traj_id.as_py() if isinstance(traj_id, pa.Scalar) else traj_id
                errors.append(RowError(source, i, traj_id if isinstance(traj_id, str) else None,
                                       "round", f"is {value}, but the shard is for round {round}"))
        if errors:
            errors.sort(key=lambda e: e.row)
            raise StoreError(format_errors(errors, f"invalid trajectories in {source}"))
        return table if table is not None else unchecked_rows_to_table(data)

    @staticmethod
    def _summary(table: pa.Table) -> tuple[bool, int]:
        has_ref = table.column("ref_logprobs").null_count == 0
        policy_version = pc.max(table.column("policy_version")).as_py()
        return has_ref, int(policy_version)

    def write_shard(self, rows: list[dict] | pa.Table, round: int,
                    name: str | None = None) -> ShardInfo:
        """Validates `rows` and commits them as a new shard of `round`; returns its ShardInfo.

        Every row's `round` must equal `round`. `name` defaults to a fresh time-ordered unique
        name. Raises StoreError for invalid rows (listing them), an empty batch, a bad name,
        or a name that is already committed (shards are never overwritten here; use
        `replace_shard`). traj_ids are not checked against other shards (that would read the
        whole store); writers that need it dedupe with `traj_ids()`.
        """
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise StoreError(f"round must be an integer >= 0, got {round!r}")
        if name is None:
            name = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
        elif not layout.NAME.fullmatch(name) or layout.VERSION_SUFFIX.search(name):
            raise StoreError(f"invalid shard name {name!r}: use letters, digits and _.=+- "
                             "(not starting with '.', not ending in '.v<number>')")
        source = f"write_shard({name!r}, round={round})"
        if self._marker(name) is not None:
            raise StoreError(f"shard {name!r} already exists in {self.root}")
        table = self._prepare(rows, round, source)
        has_ref, policy_version = self._summary(table)
        path = layout.shard_file(name, round, 1)
        size, sha256 = self._write_parquet(path, table)
        info = ShardInfo(name=name, round=round, path=path, num_rows=table.num_rows,
                         has_ref_logprobs=has_ref, policy_version=policy_version,
                         created=layout.utc_now(), version=1, size=size, sha256=sha256)
        self._write_marker(info)  # the commit point
        log.info("store %s: wrote shard %s (round %d, %d rows)", self.root, name, round,
                 info.num_rows)
        return info

    def replace_shard(self, shard: ShardInfo, table: pa.Table) -> ShardInfo:
        """Commits `table` as the next version of `shard` (e.g. with ref_logprobs filled in).

        The new rows must be the same trajectories: same row count and the same set of
        traj_ids (order may differ), all of `shard.round`. Sequence: new file, then the marker
        is atomically replaced (the commit point), then the old file is deleted; a crash in
        between leaves an orphan for `gc()`, never a broken shard. Raises StoreError if the
        shard is gone or was replaced since `shard` was read (a stale ShardInfo).
        """
        current = self._marker(shard.name)
        if current is None:
            raise StoreError(f"shard {shard.name!r} is not in the store {self.root}")
        if current.version != shard.version:
            raise StoreError(f"shard {shard.name!r} is at version {current.version}, not "
                             f"{shard.version}: it was replaced since this ShardInfo was read")
        source = f"replace_shard({shard.name!r}, round={shard.round})"
        new = self._prepare(table, current.round, source)
        if new.num_rows != current.num_rows:
            raise StoreError(f"{source}: {new.num_rows} rows, the shard has "
                             f"{current.num_rows}; a replacement must keep every trajectory")
        old_ids = set(self._read_file(current, ["traj_id"]).column("traj_id").to_pylist())
        new_ids = set(new.column("traj_id").to_pylist())
        if old_ids != new_ids:
            gone, added = sorted(old_ids - new_ids), sorted(new_ids - old_ids)
            raise StoreError(f"{source}: traj_ids differ from the shard's ({len(gone)} missing, "
                             f"e.g. {gone[:3]}; {len(added)} new, e.g. {added[:3]})")
        has_ref, policy_version = self._summary(new)
        version = current.version + 1
        path = layout.shard_file(current.name, current.round, version)
        size, sha256 = self._write_parquet(path, new)
        info = ShardInfo(name=current.name, round=current.round, path=path,
                         num_rows=new.num_rows, has_ref_logprobs=has_ref,
                         policy_version=policy_version, created=current.created,
                         version=version, size=size, sha256=sha256)
        self._write_marker(info)  # the commit point
        self._delete(current.path)
        log.info("store %s: replaced shard %s (version %d)", self.root, info.name, version)
        return info

    # ---------------------------------------------------------------- reads

    def _read_file(self, shard: ShardInfo, columns: list[str] | None) -> pa.Table:
        path = self._abs(shard.path)
        try:
            with self._fs.open_input_file(path) as f:
                # ParquetFile reads just this file: no Hive partition discovery from round=<k>.
                table = pq.ParquetFile(f).read(columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(self._damaged_message([(shard, f"cannot be read: {exc}")])) \
                from exc
        expected = TRAJECTORY_SCHEMA if columns is None else \
            pa.schema([TRAJECTORY_SCHEMA.field(c) for c in columns])
        if not table.schema.equals(expected):
            raise StoreError(f"shard {shard.name!r}: {self.uri(shard)} does not have the "
                             f"trajectory schema (found {table.schema})")
        if table.num_rows != shard.num_rows:
            raise StoreError(f"shard {shard.name!r}: {self.uri(shard)} has {table.num_rows} "
                             f"rows, its marker says {shard.num_rows}")
        return table

    def read_table(self, shards: list[ShardInfo] | None = None,
                   columns: list[str] | None = None) -> pa.Table:
        """The rows of `shards` (default: every committed shard), in order, as one table.

        `columns` selects a subset of TRAJECTORY_SCHEMA (all by default). Raises StoreError
        naming the file when a shard's file is missing, corrupt or of another schema.
        """
        unknown = [c for c in columns or () if c not in COLUMNS]
        if unknown:
            raise StoreError(f"unknown columns {unknown}; the schema has {list(COLUMNS)}")
        shards = self.shards() if shards is None else shards
        tables = [self._read_file(s, columns) for s in shards]
        if not tables:
            schema = TRAJECTORY_SCHEMA if columns is None else \
                pa.schema([TRAJECTORY_SCHEMA.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def traj_ids(self, rounds: Iterable[int] | None = None) -> set[str]:
        """Every committed traj_id (of the given rounds), reading only that column."""
        table = self.read_table(self.shards(rounds), columns=["traj_id"])
        return set(table.column("traj_id").to_pylist())

    # ---------------------------------------------------------------- integrity

    def damage(self, shard: ShardInfo) -> str | None:
        """What is wrong with the shard's file (missing, size or checksum differing from its
        marker, not Parquet), or None when it is intact. Reads the whole file."""
        path = self._abs(shard.path)
        try:
            with self._fs.open_input_stream(path) as f:
                data = f.read()
        except FileNotFoundError:
            return "its file is missing"
        except (OSError, pa.ArrowException) as exc:
            return f"its file cannot be read: {exc}"
        if shard.size is not None and len(data) != shard.size:
            return f"its file has {len(data)} bytes, its marker says {shard.size}"
        if shard.sha256 is not None:
            digest = hashlib.sha256(data).hexdigest()
            return None if digest == shard.sha256 else \
                f"its file's SHA-256 is {digest[:12]}..., its marker says {shard.sha256[:12]}..."
        try:  # a marker from before checksums: at least the file must parse
            pq.ParquetFile(pa.BufferReader(data)).read(columns=["traj_id"])
        except (OSError, pa.ArrowException) as exc:
            return f"its file is not readable Parquet: {exc}"
        return None

    def verify(self, shards: Iterable[ShardInfo] | None = None) -> list[tuple[ShardInfo, str]]:
        """(shard, what is wrong) for every damaged shard among `shards` (default: all)."""
        checked = self.shards() if shards is None else shards
        return [(s, problem) for s in checked if (problem := self.damage(s)) is not None]

    def check(self, shards: Iterable[ShardInfo] | None = None) -> None:
        """Raises StoreError naming every damaged shard (its round, file and what to do)."""
        damaged = self.verify(shards)
        if damaged:
            raise StoreError(self._damaged_message(damaged))

    def _damaged_message(self, damaged: list[tuple[ShardInfo, str]]) -> str:
        lines = [f"shard {s.name!r} (round {s.round}, {self.uri(s)}): {problem}"
                 for s, problem in damaged]
        return (f"store {self.root}: {len(damaged)} damaged shard(s):\n  " + "\n  ".join(lines)
                + "\nMove them aside with `python -m jobs.store verify --config FILE "
                "--quarantine` (nothing is deleted) and the rest of the store trains on.")

    def quarantine(self, shard: ShardInfo) -> str:
        """Moves a shard's file and then its marker under quarantine/ (the shard leaves the
        store; nothing is deleted); returns the quarantine folder, relative to the root."""
        folder = f"{layout.QUARANTINE_DIR}/{shard.name}"
        self._fs.create_dir(self._abs(folder), recursive=True)
        data = self._abs(shard.path)
        if self._fs.get_file_info(data).type == pafs.FileType.File:
            self._fs.move(data, self._abs(f"{folder}/{shard.path.rsplit('/', 1)[-1]}"))
        # The marker goes last: until it moves, the shard reads as missing, never as orphan
        # data that gc() would delete.
        self._fs.move(self._abs(f"{layout.MANIFEST_DIR}/{shard.name}.json"),
                      self._abs(f"{folder}/{shard.name}.json"))
        log.warning("store %s: quarantined shard %s (round %d, %d rows) in %s", self.root,
                    shard.name, shard.round, shard.num_rows, folder)
        return folder

    # ---------------------------------------------------------------- maintenance

    def gc(self, older_than_s: float = 3600.0) -> list[str]:
        """Deletes orphans older than `older_than_s` seconds; returns their relative paths.

        Orphans are data files no marker points to (a crash before the commit, or the old
        version after a replace) and temporary files of interrupted writes. The age limit
        protects a writer that is between its data file and its marker right now; files of
        unknown age (some object stores) are only removed with `older_than_s=0`.
        """
        live = {s.path for s in self.shards()}
        now = datetime.now(UTC)
        candidates: list[pafs.FileInfo] = []
        top = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        for entry in top:
            if entry.type == pafs.FileType.Directory and layout.ROUND_DIR.fullmatch(entry.base_name):
                candidates += self._fs.get_file_info(pafs.FileSelector(entry.path))
        candidates += [f for f in self._fs.get_file_info(pafs.FileSelector(
            self._abs(layout.MANIFEST_DIR), allow_not_found=True)) if f.base_name.startswith(layout.TMP_PREFIX)]
        removed = []
        prefix = self._root + "/"
        for f in candidates:
            relative = f.path[len(prefix):] if f.path.startswith(prefix) else f.path
            if f.type != pafs.FileType.File or relative in live:
                continue
            if older_than_s > 0:
                if f.mtime is None:
                    continue
                mtime = f.mtime if f.mtime.tzinfo else f.mtime.replace(tzinfo=UTC)
                if (now - mtime).total_seconds() < older_than_s:
                    continue
            self._delete(relative)
            removed.append(relative)
        if removed:
            log.info("store %s: gc removed %d orphan file(s)", self.root, len(removed))
        return removed

