"""One driver per run folder (pure, no Ray): run_dir/driver.lock names the driver that holds
the run (host, pid, Ray job submission id, since when) and is refreshed while it lives.

A second driver on the same folder (a re-submit while the old job still runs) is refused with
who holds it. A lock whose holder is gone is taken over: at once when the holder ran on this
host and its process is dead, else once it has not been refreshed for `stale_after_s` (a
driver on another node, or its whole node, lost). The lock file appears atomically (a hard
link of a complete file: works on local disks and NFS), so it is never seen half-written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dqo_ray.io import atomic_write

log = logging.getLogger(__name__)

LOCK_FILE = "driver.lock"


class RunFolderBusy(RuntimeError):
    """Another live driver holds the run folder (the message names it)."""


def submission_id() -> str | None:
    """The Ray job submission id when this process is a `ray job submit` entrypoint (the job
    supervisor hands its driver the job's metadata in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class DriverLock:
    """`with DriverLock(run_dir):` holds the run folder for this process, or raises
    RunFolderBusy. A thread refreshes the file's time every `heartbeat_s`; if it finds the lock
    taken over (this driver stalled past `stale_after_s`), it logs who has it and calls
    `on_lost` (the pipeline stops: two drivers must not share a run)."""

    def __init__(self, run_dir: str | os.PathLike, heartbeat_s: float = 15.0,
                 stale_after_s: float = 120.0,
                 on_lost: Callable[[], None] | None = None) -> None:
        if stale_after_s <= 2 * heartbeat_s:
            raise ValueError("stale_after_s must exceed two heartbeats")
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "job": submission_id(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "token": uuid.uuid4().hex}
        self.on_lost = on_lost
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DriverLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may release or go stale between two looks
            if self._create():
                break
            held, age = self._read()
            why = self._stale(held, age)
            if why is None:
                raise RunFolderBusy(self._busy_message(held, age))
            if held is not None and self._read()[0] == held:  # still the stale one
                log.warning("taking over %s: %s", self.path, why)
                self.path.unlink(missing_ok=True)
        else:
            raise RunFolderBusy(f"{self.path}: another driver took the run folder at the same "
                                "time; run again once it has stopped")
        self._thread = threading.Thread(target=self._beat, name="driver-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held, _ = self._read()
        if held is not None and held.get("token") == self.holder["token"]:
            self.path.unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------------

    def _create(self) -> bool:
        """Makes the lock file at once and complete (a link to a written file); False if one
        is there."""
        tmp = atomic_write(self.path.with_name(f".{LOCK_FILE}.{self.holder['token']}"),
                           json.dumps(self.holder) + "\n")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> tuple[dict[str, Any] | None, float]:
        """(the holder as written, {} if unreadable; seconds since its last refresh), or
        (None, 0) when there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            held = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            return {}, age
        return (held if isinstance(held, dict) else {}), age

    def _stale(self, held: dict[str, Any] | None, age: float) -> str | None:
        """Why the lock may be taken over, or None when its holder may be alive."""
        if held is None:
            return "released"
        if (held.get("host") == self.holder["host"] and isinstance(held.get("pid"), int)
                and not _pid_alive(held["pid"])):
            return f"its driver (pid {held['pid']} on this host) is no longer running"
        if age > self.stale_after_s:
            return (f"its driver (pid {held.get('pid')} on {held.get('host')}) has not "
                    f"refreshed it for {age:.0f}s (> {self.stale_after_s:.0f}s)")
        return None

    def _busy_message(self, held: dict[str, Any], age: float) -> str:
        if not held:
            return (f"{self.path.parent} is locked by a driver whose lock {self.path} cannot "
                    f"be read (refreshed {age:.0f}s ago); it is taken over once not refreshed "
                    f"for {self.stale_after_s:.0f}s")
        job = f", job {held['job']}" if held.get("job") else ""
        return (f"{self.path.parent} is in use by another driver: pid {held.get('pid')} on "
                f"{held.get('host')}{job}, since {held.get('since')} (its lock {self.path} was "
                f"refreshed {age:.0f}s ago). Stop that run first (`ray job stop` for a job); a "
                f"lock not refreshed for {self.stale_after_s:.0f}s is taken over.")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held, _ = self._read()
            if held is not None and held and held.get("token") != self.holder["token"]:
                self.lost = True
                log.error("%s was taken over by pid %s on %s (this driver did not refresh it "
                          "for %.0fs): stopping", self.path, held.get("pid"), held.get("host"),
                          self.stale_after_s)
                if self.on_lost is not None:
                    self.on_lost()
                return
            try:
                os.utime(self.path)
            except OSError as exc:  # a full or lost file system: the run itself will say
                log.warning("could not refresh %s: %s", self.path, exc)
