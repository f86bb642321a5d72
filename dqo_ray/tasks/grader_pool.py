"""A small pool of child processes that runs math_verify comparisons under a time limit.

Why a hand-built pool: math_verify's own timeouts use SIGALRM, which only works in a
process's main thread, while our callers are Ray actors and their threads; so its timeouts
stay off and the sympy work runs in a few persistent child processes. Each worker arms its own
SIGALRM at `timeout_s` (it runs jobs in its main thread) to abort cleanly; a call still running
at the hard limit (timeout_s + max(1 s, 20%): stuck in C code) gets its worker killed and
replaced, so a pathological input costs one timeout, grades False, and nothing leaks.

One pool per process (`verify_many`), sized and timed by the config's `grading` section:
the generator and evaluator actors pass it to `configure_grading` when they start. The
settings reach the children with each job (the limit) or not at all (the pool size is the
parent's business), so no environment variable is involved.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path

from dqo_ray.config import GradingConfig

log = logging.getLogger(__name__)


def _wrap(answer: str) -> str:
    # Both sides go to math_verify as `\boxed{...}`: its boxed extraction then takes the whole
    # answer (measured: all 5000 MATH test answers verify against themselves this way).
    return "\\boxed{" + answer + "}"


def latex_equivalent(gold: str, pred: str) -> bool:
    """math_verify equivalence of two bare LaTeX answers, with its own timeouts off.

    Runs unbounded: call it through the pool (or with an alarm armed, as the workers do).
    """
    from math_verify import parse, verify

    gold_parsed = parse(_wrap(gold), parsing_timeout=None)
    pred_parsed = parse(_wrap(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _SoftTimeout(BaseException):
    """Raised by the worker's alarm; a BaseException so math_verify's `except Exception`
    blocks cannot swallow it and carry on with the next comparison unbounded."""


def _alarm(signum, frame):  # pragma: no cover - runs inside the worker
    raise _SoftTimeout


def _bounded_equivalent(gold: str, pred: str, seconds: float | None) -> bool:
    """latex_equivalent under a SIGALRM limit when this is a main thread, else unbounded."""
    import signal

    use_alarm = bool(seconds) and threading.current_thread() is threading.main_thread()
    try:
        if use_alarm:
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return latex_equivalent(gold, pred)
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
    except _SoftTimeout:
        return False
    except Exception:  # any sympy failure on odd input means "not equal"
        log.debug("math_verify failed", exc_info=True)
        return False


def _serve(fd: int) -> None:  # pragma: no cover - runs in the child process
    """Verify-pool worker main: warm math_verify up, say ready, then serve jobs until EOF."""
    conn = Connection(fd)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout is off" warning
    try:
        latex_equivalent("1", "1")
        conn.send("ready")
    except Exception as exc:
        conn.send(f"error: {exc!r}")
        return
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if job is None:
            return
        gold, pred, seconds = job
        conn.send(_bounded_equivalent(gold, pred, seconds))


_WORKER_CODE = ("import sys; from dqo_ray.tasks.grader_pool import _serve; "
                "_serve(int(sys.argv[1]))")


class _Worker:
    """A child `python -c` process serving `_serve` over a socket pair.

    A plain subprocess rather than multiprocessing: "spawn" re-imports the parent's
    `__main__` (breaking scripts without a main guard) and "fork" is unsafe in threaded
    processes such as Ray actors.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The child imports this package from wherever the parent did (a Ray working_dir).
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, env=env, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        self.conn.close()


class VerifyPool:
    """A few child processes running `latex_equivalent` with a hard per-call deadline.

    Thread-safe: concurrent callers check workers out and back in. Workers start lazily and
    live for the process; one that overruns its deadline is killed and replaced on demand.
    """

    START_TIMEOUT_S = 120.0  # importing sympy on a busy 2-core machine can take a while

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.size = max(1, workers)
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0
        self._unavailable = False  # no worker could start: grade in the calling thread
        self.soft_alarm = True  # the workers' own SIGALRM limit (off only to test the kill)

    # -- checkout --------------------------------------------------------------------------

    def _acquire(self, n: int) -> list[_Worker]:
        """1..n workers (blocking until one is free): idle ones first, then new ones, started
        in parallel. Empty only when no process can be started here."""
        with self._cond:
            got: list[_Worker] = []
            spawn = 0
            while not got and not spawn:
                while self._idle and len(got) < n:
                    got.append(self._idle.pop())
                spawn = max(0, min(n - len(got), self.size - self._live))
                self._live += spawn
                if not got and not spawn:
                    self._cond.wait()
        if spawn:
            got.extend(self._start(spawn))
        return got

    def _start(self, n: int) -> list[_Worker]:
        started: list[_Worker] = []
        try:
            for _ in range(n):
                started.append(_Worker())
        except Exception as exc:
            log.warning("cannot start a grading worker (%r)", exc)
        ready: list[_Worker] = []
        for worker in started:
            try:
                if worker.conn.poll(self.START_TIMEOUT_S) and worker.conn.recv() == "ready":
                    ready.append(worker)
                    continue
            except (EOFError, OSError):
                pass
            log.warning("a grading worker failed to start")
            worker.kill()
        if not ready:
            # Don't pay the start timeout again on every call.
            log.warning("no grading worker could start; grading in-process from now on")
            self._unavailable = True
        with self._cond:
            self._live -= n - len(ready)
            self._cond.notify_all()
        return ready

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._cond:
            self._live -= 1
            self._cond.notify()

    def shutdown(self) -> None:
        """Stops the idle workers (busy ones are stopped by their callers)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for worker in idle:
            try:
                worker.conn.send(None)
            except OSError:
                pass
            worker.kill()

    # -- work ------------------------------------------------------------------------------

    def run(self, jobs: Sequence[tuple[str, str]]) -> list[bool]:
        """latex_equivalent(gold, pred) for each job, in parallel, each within timeout_s
        (plus a short grace for the worker's own alarm); False for any that overrun."""
        results = [False] * len(jobs)
        if not jobs:
            return results
        soft = self.timeout_s
        hard = soft + max(1.0, 0.2 * soft)
        pending = deque(range(len(jobs)))
        sends = [0] * len(jobs)
        free: list[_Worker] = []
        busy: dict[Connection, tuple[_Worker, int, float]] = {}
        try:
            while pending or busy:
                if pending and not free and not busy:
                    free = [] if self._unavailable else self._acquire(min(self.size, len(pending)))
                    if not free:
                        # No process can be started here: grade in this thread, bounded
                        # only where SIGALRM works (the main thread).
                        for i in pending:
                            results[i] = _bounded_equivalent(*jobs[i], soft)
                        break
                while pending and free:
                    worker, i = free.pop(), pending.popleft()
                    sends[i] += 1
                    try:
                        worker.conn.send((*jobs[i], soft if self.soft_alarm else None))
                    except OSError:  # an idle worker died since its last job: retry once
                        self._discard(worker)
                        if sends[i] < 2:
                            pending.appendleft(i)
                        continue
                    busy[worker.conn] = (worker, i, time.monotonic() + hard)
                if not busy:
                    continue
                wait_s = max(0.0, min(d for _, _, d in busy.values()) - time.monotonic())
                for conn in wait(list(busy), timeout=wait_s):
                    worker, i, _ = busy.pop(conn)
                    try:
                        results[i] = bool(conn.recv())
                        free.append(worker)
                    except (EOFError, OSError):  # the worker died mid-job (e.g. out of memory)
                        self._discard(worker)
                now = time.monotonic()
                for conn, (worker, i, deadline) in list(busy.items()):
                    if deadline <= now and not conn.poll(0):
                        del busy[conn]
                        log.warning("math_verify exceeded %.1fs; graded False and its worker "
                                    "replaced (gold=%.80r, pred=%.80r)", hard, *jobs[i])
                        self._discard(worker)
        finally:
            for worker in free:
                self._release(worker)
            for worker, _, _ in busy.values():  # only on an exception (e.g. KeyboardInterrupt)
                self._discard(worker)
        return results


_POOL = VerifyPool(GradingConfig().workers, GradingConfig().timeout_s)
atexit.register(_POOL.shutdown)


def configure_grading(settings: GradingConfig) -> None:
    """Applies the config's `grading` section to this process's pool: the per-call time limit
    at once, a new size by restarting the idle workers lazily (only when it changed: a start
    costs the sympy import)."""
    if settings.timeout_s <= 0:
        raise ValueError(f"grading.timeout_s must be > 0, got {settings.timeout_s}")
    if settings.workers < 1:
        raise ValueError(f"grading.workers must be >= 1, got {settings.workers}")
    _POOL.timeout_s = float(settings.timeout_s)
    if settings.workers != _POOL.size:
        with _POOL._cond:
            _POOL.size = settings.workers
            _POOL._unavailable = False  # worth another try
        _POOL.shutdown()


def grading_settings() -> GradingConfig:
    """The settings this process's pool runs with."""
    return GradingConfig(workers=_POOL.size, timeout_s=_POOL.timeout_s)


def verify_many(jobs: Sequence[tuple[str, str]]) -> list[bool]:
    """`latex_equivalent(gold, pred)` for each (gold, pred), in parallel in this process's
    pool, each within the configured limit (False for one that overruns)."""
    return _POOL.run(jobs)


def shutdown_grading_pool() -> None:
    """Stops the idle verify workers now (they also stop with the process)."""
    _POOL.shutdown()
