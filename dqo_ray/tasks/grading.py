"""Answer extraction and grading: one entry point, `grade(task, response, gold) -> bool`.

Graders live in a registry keyed by task name (`register_grader`), so a new task plugs in
without touching the callers. Built in:

- gsm8k: the final number of the response, looked for in this order: the fixed answer line
  `The answer is <number>.` (what the prompts ask for), `#### <number>`, the last `\\boxed{}`,
  other "answer is" / "answer:" phrasings, and finally the last number in the text. Numbers
  are compared exactly as rationals after dropping thousands commas, `$` and units, so
  "18.00" == "18" but "18.5" != "18".
- math / math500: the last `\\boxed{...}` (or `\\fbox{...}`) of the response, compared with the
  gold answer first as normalised strings (the common case, microseconds) and only when those
  differ by `math_verify` (sympy equivalence: fractions vs decimals, intervals, tuples, ...).
- tinymath: the integer right after the last `The answer is` of the response (exact case,
  as the synthetic solutions write it), compared with the gold integer; no such integer
  (none, a decimal, or a last anchor without a number) grades False.

Contract: grading never raises on any response text (garbage, empty, huge) and returns False
instead; math_verify work runs under a per-call time limit. math_verify's own timeouts use
SIGALRM, which only works in a process's main thread, while our callers are Ray actors and
their threads; so its timeouts stay off and the sympy work runs in a small persistent pool
of child processes (`_VerifyPool`). Each worker arms its own SIGALRM at `timeout_s` (it runs
jobs in its main thread) to abort cleanly; a call still running at the hard limit
(timeout_s + max(1 s, 20%): stuck in C code) gets its worker killed and replaced, so a
pathological input costs one timeout, grades False, and nothing leaks.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection, wait
from pathlib import Path

log = logging.getLogger(__name__)

GraderFn = Callable[[str, str], bool]
BatchGraderFn = Callable[[Sequence[str], Sequence[str]], list[bool]]

DEFAULT_TIMEOUT_S = 5.0
"""Per-comparison limit for math_verify work (sympy can run for ever on a power tower)."""
DEFAULT_WORKERS = 2
"""Processes in the verify pool: small, because the cheap string path settles most calls."""

# --------------------------------------------------------------------------------------------
# Extraction helpers (pure, shared with the dataset loaders)
# --------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (balanced braces), or None.

    Also accepts the brace-less `\\boxed 2` form found in a few MATH solutions. An unbalanced
    last box (a response cut off mid-answer) gives None rather than an earlier box, which
    would usually be an intermediate result.
    """
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # `\boxed 2$.`: one token, up to whitespace or the closing `$`.
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0).rstrip(".,;") if m else None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # an escaped brace `\{` does not count
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
        j += 1
    return None


# A number: optional sign (not a hyphen glued to a preceding word or number), optional `$`,
# digits with proper thousands groups or plain digits, optional decimals, optional `/denom`.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)\]}])[-\u2212])?(?:\\?\$\s?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?"
)


def _to_fraction(match: re.Match[str]) -> Fraction | None:
    try:
        value = Fraction(match.group("num").replace(",", ""))
        if match.group("den"):
            den = Fraction(match.group("den"))
            if den == 0:
                return None
            value /= den
    except (ValueError, ZeroDivisionError, OverflowError):
        return None  # e.g. a digit string longer than int's 4300-digit parse limit
    return -value if match.group("sign") else value


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact rational ("1,080" -> 1080, "-$2.50" -> -5/2)."""
    for m in _NUMBER.finditer(text):
        value = _to_fraction(m)
        if value is not None:
            return value
    return None


def _last_number(text: str) -> Fraction | None:
    value = None
    for m in _NUMBER.finditer(text):
        parsed = _to_fraction(m)
        if parsed is not None:
            value = parsed
    return value


# Anchors for the GSM8K answer, most specific first. The fixed form is the one our prompts ask
# for; the others catch models (and few-shot habits) that phrase it differently.
_FIXED_ANCHOR = re.compile(r"the\s+answer\s+is\s*:?", re.IGNORECASE)
_HASH_ANCHOR = re.compile(r"####\s*")
_LOOSE_ANCHOR = re.compile(r"answer\s*(?:is|:|=|would\s+be|will\s+be)\s*:?", re.IGNORECASE)
_TEXT_BLOCK = re.compile(r"\\(?:text|mbox|mathrm|textbf|operatorname)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _number_after(text: str, anchor: re.Pattern[str]) -> Fraction | None:
    """The first number on the same line after the last `anchor` that has one."""
    for m in reversed(list(anchor.finditer(text))):
        line = text[m.end():].split("\n", 1)[0]
        value = parse_number(_FRAC.sub(r"\1/\2", line))
        if value is not None:
            return value
    return None


def _number_in_box(content: str) -> Fraction | None:
    # `\boxed{18 \text{ cm}^2}` -> 18, `\boxed{2 \times 9 = 18}` -> 18, `\boxed{\frac{3}{4}}`.
    text = _FRAC.sub(r"\1/\2", content)
    unit = _TEXT_BLOCK.search(text)
    if unit:
        text = text[:unit.start()]
    text = text.rsplit("=", 1)[-1]
    return parse_number(text)


def extract_gsm8k_answer(response: str) -> Fraction | None:
    """The final numeric answer of a GSM8K-style response, or None (see module docstring)."""
    if not isinstance(response, str) or not response:
        return None
    for anchor in (_FIXED_ANCHOR, _HASH_ANCHOR):
        value = _number_after(response, anchor)
        if value is not None:
            return value
    boxed = extract_boxed(response)
    if boxed is not None:
        value = _number_in_box(boxed)
        if value is not None:
            return value
    value = _number_after(response, _LOOSE_ANCHOR)
    if value is not None:
        return value
    return _last_number(response)


# --------------------------------------------------------------------------------------------
# LaTeX answers: cheap normalisation, then math_verify in the pool
# --------------------------------------------------------------------------------------------

_SPACING = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~|\s+")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")


def normalize_latex(answer: str) -> str:
    """A conservative canonical form of a LaTeX answer for the string fast path.

    Only rewrites that never change the value (spacing, `\\left`/`\\right`, `\\dfrac`,
    `\\displaystyle`, surrounding `$`, a trailing period, `^\\circ`), so equal normal forms
    imply equivalence and everything else is left to math_verify.
    """
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = s.replace("\\displaystyle", "")
    s = _LEFT_RIGHT.sub("", s)
    s = _DEGREES.sub("", s)
    s = _SPACING.sub("", s)
    return s.rstrip(".")


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


_WORKER_CODE = "import sys; from dqo_ray.tasks.grading import _serve; _serve(int(sys.argv[1]))"


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


class _VerifyPool:
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


_POOL = _VerifyPool(int(os.environ.get("DQO_GRADER_WORKERS", DEFAULT_WORKERS)),
                    float(os.environ.get("DQO_GRADER_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
atexit.register(_POOL.shutdown)


def configure_grading(*, timeout_s: float | None = None, workers: int | None = None) -> None:
    """Sets the per-call math_verify time limit and/or the verify-pool size (process-wide).

    Defaults: DEFAULT_TIMEOUT_S / DEFAULT_WORKERS, or the DQO_GRADER_TIMEOUT_S /
    DQO_GRADER_WORKERS environment variables. Changing the size restarts idle workers lazily.
    """
    if timeout_s is not None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        _POOL.timeout_s = float(timeout_s)
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        with _POOL._cond:
            _POOL.size = workers
            _POOL._unavailable = False  # worth another try
        _POOL.shutdown()


def shutdown_grading_pool() -> None:
    """Stops the idle verify workers now (they also stop with the process)."""
    _POOL.shutdown()


# --------------------------------------------------------------------------------------------
# Built-in graders
# --------------------------------------------------------------------------------------------

def grade_gsm8k(response: str, gold: str) -> bool:
    """GSM8K: the response's final number equals the gold number exactly."""
    expected = parse_number(str(gold))
    got = extract_gsm8k_answer(response)
    return expected is not None and got is not None and got == expected


def _gold_latex(gold: str) -> str:
    # The gold is the bare answer; tolerate one passed still boxed.
    return (extract_boxed(gold) if "\\boxed" in gold or "\\fbox" in gold else gold) or ""


def _math_prepare(response: str, gold: str) -> tuple[bool | None, tuple[str, str] | None]:
    """(verdict, None) when settled without sympy, else (None, (gold, pred)) to verify."""
    if not isinstance(response, str) or not isinstance(gold, str):
        return False, None
    gold = _gold_latex(gold)
    pred = extract_boxed(response)
    if not pred or not gold.strip():
        return False, None
    if normalize_latex(pred) == normalize_latex(gold):
        return True, None
    return None, (gold, pred)


def grade_math(response: str, gold: str) -> bool:
    """MATH: the response's last `\\boxed{}` is equivalent to the gold LaTeX answer."""
    verdict, job = _math_prepare(response, gold)
    if job is None:
        return bool(verdict)
    return _POOL.run([job])[0]


def grade_math_many(responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """grade_math over a batch; the math_verify cases run in parallel in the pool."""
    results: list[bool] = []
    jobs: list[tuple[str, str]] = []
    where: list[int] = []
    for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
        verdict, job = _math_prepare(response, gold)
        results.append(bool(verdict))
        if job is not None:
            jobs.append(job)
            where.append(i)
    for i, ok in zip(where, _POOL.run(jobs), strict=True):
        results[i] = ok
    return results


_TINYMATH_ANCHOR = "The answer is"
_TINYMATH_INTEGER = re.compile(r"\s*(-?\d{1,30})(?!\d|\.\d)")


def extract_tinymath_answer(response: str) -> int | None:
    """The integer after the last "The answer is" of `response`, or None (see the module
    docstring). An earlier anchor never stands in for a last one without a number."""
    if not isinstance(response, str):
        return None
    at = response.rfind(_TINYMATH_ANCHOR)
    if at < 0:
        return None
    m = _TINYMATH_INTEGER.match(response, at + len(_TINYMATH_ANCHOR))
    return int(m.group(1)) if m else None


def _gold_int(gold: str) -> int | None:
    m = _TINYMATH_INTEGER.fullmatch(str(gold).strip())
    return int(m.group(1)) if m else None


def grade_tinymath(response: str, gold: str) -> bool:
    """tinymath: the response's answer-line integer equals the gold integer."""
    expected = _gold_int(gold)
    return expected is not None and extract_tinymath_answer(response) == expected


def grade_tinymath_many(responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """grade_tinymath over a batch (no pool work: the per-call overhead is all it saves)."""
    return [grade_tinymath(r, g) for r, g in zip(responses, golds, strict=True)]


# --------------------------------------------------------------------------------------------
# Registry and the public entry points
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grader:
    """A task's grader: `fn(response, gold) -> bool`, and optionally a faster batch form."""

    fn: GraderFn
    batch_fn: BatchGraderFn | None = None


_GRADERS: dict[str, Grader] = {}


def register_grader(task: str, fn: GraderFn, *, batch_fn: BatchGraderFn | None = None,
                    replace: bool = False) -> None:
    """Registers the grader for `task` (e.g. "tinymath").

    `fn(response, gold) -> bool` runs in the caller's thread and must be quick and bounded
    (exceptions it raises become False in `grade`); `batch_fn(responses, golds)` is used by
    `grade_many` when given.
    """
    if task in _GRADERS and not replace:
        raise ValueError(f"a grader for task {task!r} is already registered "
                         "(pass replace=True to override it)")
    _GRADERS[task] = Grader(fn, batch_fn)


def registered_tasks() -> tuple[str, ...]:
    """Names of the tasks that have a grader."""
    return tuple(sorted(_GRADERS))


def _grader(task: str) -> Grader:
    try:
        return _GRADERS[task]
    except KeyError:
        raise ValueError(f"no grader for task {task!r}; known: "
                         f"{', '.join(registered_tasks())}") from None


def grade(task: str, response: str, gold: str) -> bool:
    """True when `response` reaches the gold final answer of a `task` problem.

    Never raises on the response or gold text (returns False); raises ValueError only for an
    unknown task. Safe to call from any thread.
    """
    grader = _grader(task)
    try:
        return bool(grader.fn(response, gold))
    except Exception:  # a grader bug on odd text must not kill a rollout
        log.warning("grader for %s raised; graded False", task, exc_info=True)
        return False


def grade_many(task: str, responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """`grade` over pairs (same length), using the task's batch grader when it has one."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    grader = _grader(task)
    if grader.batch_fn is not None:
        try:
            return [bool(x) for x in grader.batch_fn(responses, golds)]
        except Exception:
            log.warning("batch grader for %s raised; grading one by one", task, exc_info=True)
    return [grade(task, r, g) for r, g in zip(responses, golds, strict=True)]


register_grader("gsm8k", grade_gsm8k)
register_grader("math", grade_math, batch_fn=grade_math_many)
register_grader("math500", grade_math, batch_fn=grade_math_many)
register_grader("tinymath", grade_tinymath, batch_fn=grade_tinymath_many)
