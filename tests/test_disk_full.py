"""A full disk is named, not a traceback (issue 26, item 7): the file and what was being
written, in one line; nothing half-written; a re-run after freeing space resumes. On a real
small file system (a tmpfs mounted for the test), filled to the last byte."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from dqo_ray.data.store import TrajectoryStore
from dqo_ray.io import DiskFull, atomic_write, disk_full_in


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk):
    """Takes every free byte of `disk` with one file; deleting it frees the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_file_written_on_a_full_disk_is_named_and_the_old_one_kept(small_disk):
    target = small_disk / "run" / "pipeline_state.json"
    atomic_write(target, "old")
    fill(small_disk)
    with pytest.raises(DiskFull) as info:
        atomic_write(target, "x" * 100_000, what="the run state")
    assert str(info.value) == (f"disk full: no space left for {target} (while writing the run "
                               "state); free space there and run the same command again: it "
                               "resumes")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["pipeline_state.json"]  # no temp file


def test_a_full_disk_in_a_ray_task_is_found_behind_ray(small_disk, ray_address):
    """The generator's engines write shards in actors: the driver finds the DiskFull behind
    Ray's error, as the pipeline does to end with its line (exit 2)."""
    import ray

    @ray.remote(num_cpus=0)
    def write(path: str) -> None:
        atomic_write(path, "x" * 100_000, what="a shard")

    fill(small_disk)
    with pytest.raises(Exception) as info:
        ray.get(write.remote(str(small_disk / "shard.parquet")))
    full = disk_full_in(info.value)
    assert full is not None and full.filename == str(small_disk / "shard.parquet")
    assert "(while writing a shard)" in str(full)


def test_ingest_into_a_full_store_ends_with_one_line_and_resumes(small_disk, tmp_path, capsys,
                                                                  tiny_checkpoint):
    from jobs.ingest import main

    records = [{"prompt": "Tom has 3 apples. How many left?", "response": "the answer is 2",
                "reward": 1.0}] * 50
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  store: {small_disk / 'store'}\n")
    argv = ["--config", str(config), "--input", str(source), "--tokenizer", str(tiny_checkpoint)]
    filler = fill(small_disk)

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ingest failed: disk full: no space left for {small_disk}/store")
    assert "while writing the trajectory store" in err[-1] and "Traceback" not in "\n".join(err)
    assert TrajectoryStore(small_disk / "store").num_rows() == 0  # nothing half-written

    filler.unlink()  # space freed: the same command again
    assert main(argv) == 0
    assert TrajectoryStore(small_disk / "store").num_rows() == 50


def test_a_pipeline_whose_run_folder_is_full_ends_with_one_line(small_disk):
    """Before anything starts: the driver's lock is the run folder's first write."""
    from test_pipeline import REPO, _env

    filler = fill(small_disk)
    run = small_disk / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", str(REPO / "configs" / "ci-small.yaml"),
         "--set", f"run.output_dir={run}", "--set", f"data.store={small_disk / 'store'}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"disk full: no space left for {run / 'ci-small'}/"), result.stderr
    assert [p.name for p in (run / "ci-small").iterdir()] == []  # nothing half-written
    filler.unlink()


def test_a_full_disk_in_a_trainer_worker_is_found_behind_ray_train(tmp_path):
    """A checkpoint upload into a full run folder fails in a Ray Train worker: fit() raises
    Ray Train's WorkerGroupError holding each worker's exception, and the pipeline's line
    comes from the DiskFull inside."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    target = tmp_path / "train" / "checkpoint-0000004"
    inner = DiskFull(errno.ENOSPC, "while writing a checkpoint into the run folder", str(target))
    error = WorkerGroupError("Training failed due to worker errors", {1: RuntimeError("ok"),
                                                                      0: inner})
    assert disk_full_in(error) is inner
    assert str(disk_full_in(error)).startswith(f"disk full: no space left for {target} (while "
                                               "writing a checkpoint into the run folder)")
    assert disk_full_in(WorkerGroupError("no disk involved", {0: RuntimeError("x")})) is None
