"""Trajectory schema and store: round trips, atomic commits, crash leftovers, replacement,
corrupt files and row validation messages."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pytest

from dqo_ray.data import store as store_module
from dqo_ray.data.schema import (
    COLUMNS,
    TRAJECTORY_SCHEMA,
    RowError,
    StoreError,
    rows_to_table,
    table_to_rows,
    validate_rows,
    validate_table,
)
from dqo_ray.data.store import TrajectoryStore
from jobs import store as store_job


def make_row(i: int, round: int = 0, **overrides) -> dict:
    """A valid row; float values are exact in float32 so round trips compare equal."""
    row = {
        "traj_id": f"t{i}", "prompt_id": f"p{i // 2}", "round": round, "policy_version": i % 3,
        "dataset": "unit", "prompt": f"prompt {i}", "response": f"response {i}",
        "prompt_ids": [1, 2, 3 + i], "response_ids": [4, 5, 6],
        "behaviour_logprobs": [-0.5, -0.25, 0.0], "reward": float(i % 2), "correct": bool(i % 2),
        "finish_reason": "stop", "step_ends": [0, 2], "step_rewards": [0.5, -1.0],
        "step_values": [0.25, 0.5],
        "ref_logprobs": None,
    }
    row.update(overrides)
    return row


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path) -> TrajectoryStore:
    return TrajectoryStore(tmp_path / "store")


# ------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", ["path", "relative", "uri"])
def test_round_trip_local_path_and_file_uri(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    root = {"path": str(tmp_path / "s"), "relative": "s", "uri": f"file://{tmp_path}/s"}[kind]
    store = TrajectoryStore(root)
    rows = [make_row(i) for i in range(5)]
    rows[3].update(behaviour_logprobs=None, step_ends=None, step_rewards=None, step_values=None)
    info = store.write_shard(rows, round=0, name="first")

    assert info.name == "first" and info.round == 0 and info.version == 1
    assert info.path == "round=0/first.parquet"
    assert info.num_rows == 5 and info.policy_version == 2 and not info.has_ref_logprobs
    assert store.shards() == [info]
    assert store.read_table().schema.equals(TRAJECTORY_SCHEMA)
    assert table_to_rows(store.read_table()) == rows
    assert (tmp_path / "s" / "round=0" / "first.parquet").is_file()
    assert (tmp_path / "s" / "manifest" / "first.json").is_file()
    # uri() and paths() point at the same file, readable by a second store on the same root
    assert store.paths([info]) == [f"{tmp_path}/s/round=0/first.parquet"]
    expected_uri = f"file://{tmp_path}/s/round=0/first.parquet" if kind == "uri" else \
        f"{tmp_path}/s/round=0/first.parquet"
    assert store.uri(info) == expected_uri
    assert store.filesystem.get_file_info(store.paths([info])[0]).size > 0
    other = TrajectoryStore(f"file://{tmp_path}/s" if kind != "uri" else str(tmp_path / "s"))
    assert table_to_rows(other.read_table()) == rows


def test_shards_rounds_counts_and_column_reads(store):
    a = store.write_shard([make_row(i, round=1) for i in range(3)], round=1, name="b")
    b = store.write_shard([make_row(i, round=0) for i in range(3, 5)], round=0, name="z")
    c = store.write_shard([make_row(i, round=1) for i in range(5, 9)], round=1, name="a")
    assert store.shards() == [b, c, a]  # by (round, name)
    assert store.shards(rounds=[1]) == [c, a]
    assert store.rounds() == [0, 1]
    assert store.num_rows() == 9 and store.num_rows([0]) == 2 and store.num_rows([2]) == 0
    assert store.traj_ids([0]) == {"t3", "t4"}
    assert store.traj_ids() == {f"t{i}" for i in range(9)}
    sub = store.read_table([c], columns=["traj_id", "reward"])
    assert sub.column_names == ["traj_id", "reward"]
    assert sub.column("traj_id").to_pylist() == ["t5", "t6", "t7", "t8"]


def test_empty_store_reads_empty_table(store):
    assert store.shards() == [] and store.rounds() == [] and store.num_rows() == 0
    assert store.read_table().num_rows == 0
    assert store.read_table().schema.equals(TRAJECTORY_SCHEMA)
    assert store.traj_ids() == set()


def test_table_input_is_cast_to_the_schema(store):
    rows = [make_row(i) for i in range(3)]
    # int64 / float64 / list<int64> as a pandas or numpy round trip would leave them
    loose = pa.Table.from_pylist(rows)
    assert loose.schema.field("prompt_ids").type == pa.list_(pa.int64())
    info = store.write_shard(loose, round=0)
    assert table_to_rows(store.read_table([info])) == rows
    with pytest.raises(StoreError, match=r"unexpected: \['extra'\]"):
        store.write_shard(loose.append_column("extra", pa.array([1, 2, 3])), round=0)


def test_existing_or_invalid_names_are_refused(store):
    store.write_shard([make_row(0)], round=0, name="s")
    with pytest.raises(StoreError, match="shard 's' already exists"):
        store.write_shard([make_row(1)], round=0, name="s")
    for bad in ("a/b", ".hidden", "x.v2", ""):
        with pytest.raises(StoreError, match="invalid shard name"):
            store.write_shard([make_row(1)], round=0, name=bad)
    with pytest.raises(StoreError, match="no rows"):
        store.write_shard([], round=0)
    assert store.num_rows() == 1


# ------------------------------------------------------------------------------- atomicity

def test_crash_before_marker_leaves_invisible_orphan_that_gc_removes(store, monkeypatch):
    store.write_shard([make_row(0)], round=0, name="good")

    def crash(self, info):
        raise RuntimeError("killed before commit")

    monkeypatch.setattr(TrajectoryStore, "_write_marker", crash)
    with pytest.raises(RuntimeError, match="killed before commit"):
        store.write_shard([make_row(1)], round=0, name="lost")
    monkeypatch.undo()

    root = Path(store._root)
    assert "round=0/lost.parquet" in files(root)  # the data file is there...
    assert [s.name for s in store.shards()] == ["good"]  # ...but not visible
    assert store.traj_ids() == {"t0"}
    assert store.gc() == []  # younger than the default age: maybe a writer in progress
    assert store.gc(older_than_s=0) == ["round=0/lost.parquet"]
    assert files(root) == ["manifest/good.json", "round=0/good.parquet"]
    # the name is free again
    store.write_shard([make_row(1)], round=0, name="lost")
    assert store.traj_ids() == {"t0", "t1"}


def test_temp_files_are_never_visible_and_are_cleaned(store, monkeypatch):
    root = Path(store._root)
    seen_during_write = []
    real_write = TrajectoryStore._write_bytes_atomic

    def spying_write(self, relative, write):
        def recording(out):
            write(out)
            if relative.endswith(".parquet"):
                seen_during_write.append((files(root), store.shards()))
        real_write(self, relative, recording)

    monkeypatch.setattr(TrajectoryStore, "_write_bytes_atomic", spying_write)
    info = store.write_shard([make_row(0)], round=0, name="s")
    (during, visible), = seen_during_write
    assert len(during) == 1 and during[0].startswith("round=0/.tmp-")
    assert during[0].endswith("-s.parquet")
    assert visible == []
    assert files(root) == ["manifest/s.json", "round=0/s.parquet"]

    # a write that dies half way removes its temp file and shows nothing
    def dying_write(self, relative, write):
        def partial(out):
            out.write(b"PAR1 partial")
            raise OSError("disk full")
        real_write(self, relative, partial)

    monkeypatch.setattr(TrajectoryStore, "_write_bytes_atomic", dying_write)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard([make_row(1)], round=0, name="t")
    assert files(root) == ["manifest/s.json", "round=0/s.parquet"]
    assert store.shards() == [info]

    # temp files a killed process left behind are ignored, then collected
    (root / "round=0" / ".tmp-dead-u.parquet").write_bytes(b"junk")
    (root / "manifest" / ".tmp-dead-u.json").write_text("{")
    assert store.shards() == [info] and store.num_rows() == 1
    assert sorted(store.gc(older_than_s=0)) == ["manifest/.tmp-dead-u.json",
                                                 "round=0/.tmp-dead-u.parquet"]
    assert files(root) == ["manifest/s.json", "round=0/s.parquet"]


# ------------------------------------------------------------------------------- replace

def test_replace_shard_persists_new_values_and_keeps_one_file(store):
    rows = [make_row(i) for i in range(4)]
    info = store.write_shard(rows, round=0, name="s")
    table = store.read_table([info])
    ref = [[-1.0, -2.0, -0.5]] * 4
    filled = table.set_column(COLUMNS.index("ref_logprobs"), "ref_logprobs",
                              pa.array(ref, pa.list_(pa.float32())))
    new = store.replace_shard(info, filled.take([3, 2, 1, 0]))  # order may change

    assert new.version == 2 and new.path == "round=0/s.v2.parquet"
    assert new.has_ref_logprobs and new.num_rows == 4 and new.created == info.created
    assert store.shards() == [new]
    back = table_to_rows(store.read_table())
    assert [r["ref_logprobs"] for r in back] == ref
    assert sorted(back, key=lambda r: r["traj_id"]) == \
        [dict(r, ref_logprobs=ref[0]) for r in rows]
    assert files(Path(store._root)) == ["manifest/s.json", "round=0/s.v2.parquet"]

    third = store.replace_shard(new, store.read_table([new]))
    assert third.version == 3
    assert files(Path(store._root)) == ["manifest/s.json", "round=0/s.v3.parquet"]
    with pytest.raises(StoreError, match="at version 3, not 2"):
        store.replace_shard(new, store.read_table([third]))


def test_replace_shard_must_keep_the_trajectories(store):
    info = store.write_shard([make_row(i) for i in range(3)], round=0, name="s")
    table = store.read_table([info])
    with pytest.raises(StoreError, match="2 rows, the shard has 3"):
        store.replace_shard(info, table.slice(0, 2))
    renamed = pa.Table.from_pylist([make_row(0), make_row(1), make_row(7)])
    with pytest.raises(StoreError, match=r"1 missing, e.g. \['t2'\]; 1 new, e.g. \['t7'\]"):
        store.replace_shard(info, renamed)
    with pytest.raises(StoreError, match=r"row 0 \(traj_id=t0\): round: is 1, but the shard "
                       "is for round 0"):
        store.replace_shard(info, pa.Table.from_pylist([make_row(i, round=1) for i in range(3)]))
    with pytest.raises(StoreError, match="not in the store"):
        store.replace_shard(store_module.ShardInfo("nope", 0, "round=0/nope.parquet", 1,
                                                   False, 0, "", 1), table)
    assert store.shards() == [info]
    assert table_to_rows(store.read_table()) == table_to_rows(table)


# ------------------------------------------------------------------------------- corruption

def test_corrupt_or_missing_file_names_the_shard_file(store):
    info = store.write_shard([make_row(0)], round=0, name="s")
    path = Path(store.paths([info])[0])
    path.write_bytes(b"not parquet at all")
    with pytest.raises(StoreError, match=re.escape(f"shard 's' (round 0, {path}): cannot be "
                                                   "read: Parquet magic bytes not found")):
        store.read_table()
    path.unlink()
    with pytest.raises(StoreError, match=re.escape(f"shard 's' (round 0, {path}): cannot be")):
        store.traj_ids()


def damage_file(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped byte in the middle: same size, still a Parquet footer
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_shard_is_found_named_and_quarantined(store, how):
    good = store.write_shard([make_row(i) for i in range(4)], round=0, name="good")
    bad = store.write_shard([make_row(i, round=1) for i in range(4, 8)], round=1, name="bad")
    assert bad.size == Path(store.paths([bad])[0]).stat().st_size and len(bad.sha256) == 64
    assert store.verify() == []
    path = Path(store.paths([bad])[0])
    damage_file(path, how)

    (shard, problem), = store.verify()
    assert shard == bad
    assert problem.startswith("its file has" if how == "truncated" else "its file's SHA-256 is")
    with pytest.raises(StoreError) as info:
        store.check()
    text = str(info.value)
    assert f"shard 'bad' (round 1, {path}): {problem}" in text
    assert "python -m jobs.store verify --config FILE --quarantine" in text
    store.check([good])  # the intact shard alone passes

    folder = store.quarantine(bad)
    assert store.shards() == [good] and store.verify() == []
    assert sorted(files(Path(store._root))) == [
        "manifest/good.json", f"{folder}/bad.json", f"{folder}/bad.parquet",
        "round=0/good.parquet"]
    assert store.gc(older_than_s=0) == []  # quarantine is never collected
    assert len(store.read_table()) == 4


def test_markers_without_checksums_are_checked_by_parsing(store):
    info = store.write_shard([make_row(0)], round=0, name="s")
    marker = Path(store._root) / "manifest" / "s.json"
    raw = json.loads(marker.read_text())
    del raw["size"], raw["sha256"]
    marker.write_text(json.dumps(raw))  # as written before checksums existed
    (old,) = store.shards()
    assert old.size is None and store.verify() == []
    Path(store.paths([info])[0]).write_bytes(b"PAR1 not really")
    assert "not readable Parquet" in store.verify()[0][1]


def test_store_verify_job_lists_and_quarantines(tmp_path, capsys):
    store = TrajectoryStore(tmp_path / "store")
    store.write_shard([make_row(0)], round=0, name="fine")
    bad = store.write_shard([make_row(1)], round=0, name="broken")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{store: {tmp_path / 'store'}}}\n")
    assert store_job.main(["verify", "--config", str(cfg)]) == 0
    assert "2 shards, 2 rows checked" in capsys.readouterr().out
    damage_file(Path(store.paths([bad])[0]), "truncated")
    assert store_job.main(["verify", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "broken        1 rows  DAMAGED: its file has" in out and "1 damaged" in out
    assert [s.name for s in store.shards()] == ["broken", "fine"]
    assert store_job.main(["verify", "--config", str(cfg), "--quarantine"]) == 0
    assert "-> moved to quarantine/broken" in capsys.readouterr().out
    assert [s.name for s in store.shards()] == ["fine"]
    assert store_job.main(["verify", "--config", str(cfg), "--set", "data.stor=x"]) == 2
    assert "data.stor: unknown key" in capsys.readouterr().err


def test_corrupt_marker_is_reported(store):
    store.write_shard([make_row(0)], round=0, name="s")
    marker = Path(store._root) / "manifest" / "s.json"
    marker.write_text("{ truncated")
    with pytest.raises(StoreError, match=re.escape(f"manifest marker {marker} is unreadable")):
        store.shards()


# ------------------------------------------------------------------------------- validation

def test_row_error_text():
    assert str(RowError("data.jsonl", 17, "abc", "response_ids", "is empty")) == \
        "data.jsonl row 17 (traj_id=abc): response_ids: is empty"
    assert str(RowError("data.jsonl", 3, None, "", "is not valid JSON", unit="line")) == \
        "data.jsonl line 3: is not valid JSON"


BAD_ROWS = [
    ({"behaviour_logprobs": [-0.5, -0.5]},
     "row 1 (traj_id=t1): behaviour_logprobs: has 2 entries for 3 response tokens"),
    ({"ref_logprobs": [-0.5, 0.5, -1.0]},
     "row 1 (traj_id=t1): ref_logprobs: entry 1 is 0.5 > 0 (log-probabilities are <= 0)"),
    ({"behaviour_logprobs": [-0.5, float("nan"), -1.0]},
     "row 1 (traj_id=t1): behaviour_logprobs: entry 1 is nan, not finite"),
    ({"response_ids": [], "behaviour_logprobs": None, "step_ends": None, "step_rewards": None,
      "step_values": None},
     "row 1 (traj_id=t1): response_ids: is empty"),
    ({"prompt_ids": []}, "row 1 (traj_id=t1): prompt_ids: is empty"),
    ({"finish_reason": "eos"},
     "row 1 (traj_id=t1): finish_reason: is 'eos', not one of 'stop', 'length'"),
    ({"traj_id": "t0"}, "row 1 (traj_id=t0): traj_id: duplicate traj_id (first at row 0)"),
    ({"round": 2}, "row 1 (traj_id=t1): round: is 2, but the shard is for round 0"),
    ({"reward": float("inf")}, "row 1 (traj_id=t1): reward: is inf, not a finite float32"),
    ({"correct": 1}, "row 1 (traj_id=t1): correct: is int 1, not a bool"),
    ({"response_ids": [4, -5, 6]}, "row 1 (traj_id=t1): response_ids: entry 1 is -5, outside"),
    ({"step_ends": [2, 1]}, "row 1 (traj_id=t1): step_ends: [2, 1] is not strictly increasing"),
    ({"step_ends": [0, 3]}, "row 1 (traj_id=t1): step_ends: [0, 3] has an entry outside [0, 3)"),
    ({"step_rewards": [1.0]}, "row 1 (traj_id=t1): step_rewards: has 1 entries for 2 step_ends"),
    ({"step_ends": None, "step_values": None},
     "row 1 (traj_id=t1): step_rewards: is given without step_ends"),
    ({"step_ends": None, "step_rewards": None},
     "row 1 (traj_id=t1): step_values: is given without step_ends"),
    ({"step_values": [0.5]}, "row 1 (traj_id=t1): step_values: has 1 entries for 2 step_ends"),
    ({"step_values": [0.5, 1.5]},
     "row 1 (traj_id=t1): step_values: [0.5, 1.5] has an entry outside [0, 1]"),
    ({"behavior_logprobs": [-1.0]}, "row 1 (traj_id=t1): behavior_logprobs: is not a trajectory "
     "column (did you mean 'behaviour_logprobs'?)"),
    ({"traj_id": None}, "row 1: traj_id: is null"),
]


@pytest.mark.parametrize(("change", "message"), BAD_ROWS,
                         ids=[m.split(": ", 1)[1][:40] for _, m in BAD_ROWS])
def test_bad_rows_are_refused_with_row_traj_id_column_and_reason(store, change, message):
    rows = [make_row(i) for i in range(3)]
    rows[1].update(change)
    with pytest.raises(StoreError) as info:
        store.write_shard(rows, round=0, name="s")
    text = str(info.value)
    assert "invalid trajectories in write_shard('s', round=0): 1 problem(s)" in text
    assert f"write_shard('s', round=0) {message}" in text
    assert store.shards() == [] and not Path(store._root).exists()


# Every case Arrow can represent (not an int in a bool column, not an unknown key).
TABLE_CASES = [case for case in BAD_ROWS if "correct" not in case[0]
               and "behavior_logprobs" not in case[0]]


@pytest.mark.parametrize(("change", "message"), TABLE_CASES,
                         ids=[m.split(": ", 1)[1][:40] for _, m in TABLE_CASES])
def test_table_input_is_validated_like_rows(store, change, message):
    rows = [make_row(i) for i in range(3)]
    rows[1].update(change)
    table = pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)  # bypasses validation
    # the vectorised table check finds exactly what the per-row check finds
    assert validate_table(table, "t") == validate_rows(table_to_rows(table), "t")
    with pytest.raises(StoreError) as info:
        store.write_shard(table, round=0, name="s")
    assert f"write_shard('s', round=0) {message}" in str(info.value)
    assert store.shards() == []


def test_table_check_passes_valid_tables_untouched():
    rows = [make_row(i) for i in range(50)]
    rows[7].update(step_ends=None, step_rewards=None, step_values=None, behaviour_logprobs=None)
    rows[9].update(ref_logprobs=[0.0, -3.0, 1e-5], step_ends=[2], step_rewards=[1.0],
                   step_values=[1.0])
    table = pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)
    assert validate_table(table, "t") == []
    sliced = pa.concat_tables([table.slice(0, 20), table.slice(20)])  # two chunks per column
    assert validate_table(sliced, "t") == []
    assert [e.row for e in validate_table(
        pa.concat_tables([table.slice(0, 20), pa.Table.from_pylist(
            [make_row(99, finish_reason="eos")], schema=TRAJECTORY_SCHEMA)]), "t")] == [20]


def test_missing_column_and_optional_columns():
    row = make_row(0)
    del row["reward"]
    errors = validate_rows([row], "batch")
    assert [str(e) for e in errors] == ["batch row 0 (traj_id=t0): reward: is missing"]
    minimal = {k: v for k, v in make_row(0).items()
               if k not in ("behaviour_logprobs", "step_ends", "step_rewards", "step_values",
                            "ref_logprobs")}
    assert validate_rows([minimal], "batch") == []
    table = rows_to_table([minimal])
    assert table.column("behaviour_logprobs").to_pylist() == [None]


def test_tiny_positive_logprob_rounding_is_accepted():
    assert validate_rows([make_row(0, behaviour_logprobs=[-1.0, 1e-5, 0.0])], "b") == []
    errors = validate_rows([make_row(0, behaviour_logprobs=[-1.0, 1e-3, 0.0])], "b")
    assert [e.column for e in errors] == ["behaviour_logprobs"]


def test_error_list_is_capped_with_a_count():
    rows = [make_row(i, finish_reason="eos") for i in range(25)]
    with pytest.raises(StoreError) as info:
        rows_to_table(rows, source="gen")
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid trajectories in gen: 25 problem(s)"
    assert lines[1] == "  gen row 0 (traj_id=t0): finish_reason: is 'eos', not one of " \
        "'stop', 'length'"
    assert len(lines) == 22 and lines[-1] == "  ... and 5 more"


def test_numpy_values_from_ray_batches_are_accepted():
    import numpy as np

    row = make_row(0, prompt_ids=np.array([1, 2], dtype=np.int64),
                   behaviour_logprobs=np.array([-0.5, -0.25, 0.0], dtype=np.float32),
                   reward=np.float32(1.0), round=np.int64(0))
    assert validate_rows([row], "b") == []
    back = table_to_rows(rows_to_table([row]))[0]
    assert back["prompt_ids"] == [1, 2] and back["behaviour_logprobs"] == [-0.5, -0.25, 0.0]
    assert math.isclose(back["reward"], 1.0)
