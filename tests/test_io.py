"""dqo_ray.io: atomic writes and crash-tolerant JSON lines."""

import json
import os

import pytest

from dqo_ray.io import append_jsonl, atomic_write, read_jsonl


def test_atomic_write_bytes_text_and_writer(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    assert atomic_write(path, "héllo") == path and path.read_text() == "héllo"
    atomic_write(path, b"bytes")
    assert path.read_bytes() == b"bytes"
    atomic_write(path, lambda f: f.write(b"from a writer"))
    assert path.read_bytes() == b"from a writer"
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, "old")

    def dying(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, dying)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_jsonl_survives_a_writer_killed_mid_line(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"a": 1})
    with open(path, "ab") as f:
        f.write(b'{"a": 2, "cut')  # a writer died here
    append_jsonl(path, {"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]
    assert "skipping line 2, not a JSON object" in caplog.text
    with open(path, "ab") as f:
        f.write(b"[1, 2]\n")  # valid JSON, not an object
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]
    assert "skipping the last line" in caplog.text
    assert json.loads(path.read_text().split("\n")[0]) == {"a": 1}
