"""Every node must see the run folder (issue 15, deliver 4): a sentinel file the driver writes
is read back by one task per node at the pipeline's start; a node that does not see it is
named. URI output folders are refused (tests/test_plan.py)."""

from __future__ import annotations

import os
import socket

import pytest

from dqo_ray.storage import (
    SENTINEL_PREFIX,
    RunFolderNotShared,
    not_shared,
    sentinel_problem,
    write_sentinel,
)


def test_sentinel_seen_missing_or_another_file(tmp_path):
    path, token = write_sentinel(tmp_path / "run")
    assert os.path.basename(path).startswith(SENTINEL_PREFIX)
    assert sentinel_problem(path, token, wait_s=0) is None
    assert "holds something else" in sentinel_problem(path, "another", wait_s=0)
    os.remove(path)
    assert sentinel_problem(path, token, wait_s=0) == f"{path} is not there"
    elsewhere = str(tmp_path / "not-mounted" / "run" / os.path.basename(path))
    assert sentinel_problem(elsewhere, token, wait_s=0) == \
        f"the folder {os.path.dirname(elsewhere)} does not exist here"


def test_sentinel_is_looked_for_again_while_a_shared_fs_catches_up(tmp_path):
    import threading

    path, token = write_sentinel(tmp_path)
    os.rename(path, path + ".late")
    threading.Timer(0.3, os.rename, (path + ".late", path)).start()
    assert sentinel_problem(path, token, wait_s=5, poll_s=0.1) is None


def test_the_refusal_names_every_node_that_does_not_see_it():
    exc = not_shared("/mnt/shared/runs/x", [("10.0.0.7", "the folder /mnt/shared/runs/x does "
                                                         "not exist here")])
    assert isinstance(exc, RunFolderNotShared)
    assert str(exc).startswith("run folder /mnt/shared/runs/x is not visible on every node "
                               "(node 10.0.0.7: the folder /mnt/shared/runs/x does not exist "
                               "here): every node must see run.output_dir")


@pytest.mark.ray
def test_one_task_per_node_reads_the_sentinel(ray_address, tmp_path):
    from dqo_ray.runtime import check_run_folder_shared, probe_nodes

    run = tmp_path / "run"
    assert check_run_folder_shared(run, wait_s=0) == 1  # the one local node sees it
    assert not any(p.name.startswith(SENTINEL_PREFIX) for p in run.iterdir())  # cleaned up
    path, token = write_sentinel(run)
    count, failures = probe_nodes(path, "not-the-token", wait_s=0)
    assert count == 1
    [(node, problem)] = failures
    assert node.startswith(socket.gethostname()) and "holds something else" in problem
    os.remove(path)
    assert probe_nodes(path, token, wait_s=0)[1][0][1] == f"{path} is not there"
