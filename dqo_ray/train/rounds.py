"""The round coordinator: the one place where the driver and a long-lived trainer group meet.

One Ray Train run serves every round of a pipeline (`train/ray_trainer.py`, RoundTrainer). Its
workers loop: ask the coordinator for the round after the last one they finished, train it,
and (rank 0) report it done. The driver posts rounds as their data is ready and waits for
them. No Ray here: RoundTrainer runs this class as a threaded actor on the driver's node (it
is gone with the driver, as the run is).

The coordinator, not Ray Train, is the record of the newest committed checkpoint: Ray Train
V2 registers a reported checkpoint only at its controller's next poll, so a worker group
restarted right after a report can get an older `get_checkpoint()` than the one the round
ended with (measured on Ray 2.60); restarted workers resume from the newer.
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

_STEP = re.compile(r"checkpoint-(\d+)$")


def checkpoint_step(path: str | None) -> int:
    """The global step in a checkpoint folder's name (checkpoint-<step>); -1 for None."""
    if path is None:
        return -1
    found = _STEP.search(str(path).rstrip("/"))
    if not found:
        raise ValueError(f"{path!r} is not a checkpoint-<step> folder")
    return int(found.group(1))


@dataclass
class RoundSpec:
    """What the trainer needs to train round `round`."""

    round: int
    data_rounds: list[int] | None  # the store rounds it reads (None: every round)
    end_step: int  # global step the round ends at
    data_stats: dict[str, float] = field(default_factory=dict)  # logged with its metrics


class RoundCoordinator:
    """Rounds posted by the driver, taken by the trainer's ranks, reported done by rank 0."""

    def __init__(self, latest_checkpoint: str | None = None) -> None:
        self._cond = threading.Condition()
        self._posted: dict[int, RoundSpec] = {}
        self._done: dict[int, dict[str, Any]] = {}  # results not yet taken by the driver
        self._finished: set[int] = set()  # rounds reported done
        self._stopped = False
        self._latest = latest_checkpoint
        self.starts = 0  # train-function starts of rank 0: 1 + the group's restarts
        self._ranks_started: set[int] = set()
        self._persisted: dict[str, set[int]] = {}  # checkpoint -> ranks whose part is in

    # -- the driver ------------------------------------------------------------------------

    def post(self, spec: dict[str, Any]) -> None:
        with self._cond:
            self._posted[spec["round"]] = RoundSpec(**spec)
            self._cond.notify_all()

    def wait_done(self, round: int, timeout_s: float) -> dict[str, Any] | None:
        """Round `round`'s result once rank 0 reported it; None after `timeout_s` (the driver
        polls, so that it notices a trainer run that ended with an error)."""
        with self._cond:
            self._cond.wait_for(lambda: round in self._done, timeout=timeout_s)
            return self._done.pop(round, None)

    def stop(self) -> None:
        """No more rounds: each rank's `next_round` returns None and the train function ends."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- the trainer's ranks ---------------------------------------------------------------

    def started(self, rank: int) -> int:
        """Called by every rank when its train function starts; returns the start count."""
        with self._cond:
            if rank == 0:
                self.starts += 1
            if rank >= 0:
                self._ranks_started.add(rank)
                self._cond.notify_all()
            return self.starts

    def wait_started(self, world: int, timeout_s: float) -> bool:
        """Whether all `world` ranks have started (each placed, holding its resources), waiting
        up to `timeout_s`."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._ranks_started) >= world,
                                       timeout=timeout_s)

    def next_round(self, after: int, timeout_s: float) -> dict[str, Any] | str | None:
        """The first round after `after` that is posted and not yet reported done (a restarted
        group asks with after=-1: rounds done since the driver started are skipped, and a
        resumed driver posts its first unfinished round only); None when stopped; "wait"
        after `timeout_s` (the ranks ask again: a blocked call must not outlive a dead caller
        for long)."""
        def pending() -> list[int]:
            return sorted(r for r in self._posted if r > after and r not in self._finished)

        with self._cond:
            self._cond.wait_for(lambda: self._stopped or pending(), timeout=timeout_s)
            if rounds := pending():
                return asdict(self._posted[rounds[0]])
            return None if self._stopped else "wait"

    def checkpointed(self, path: str, rank: int = 0, world: int = 1) -> None:
        """Each of the `world` ranks, once Ray Train persisted its part of the checkpoint at
        `path`: with every rank's part there, it is the newest resume point. (A rank killed
        while uploading its part leaves the checkpoint without it: resuming from it failed
        on the missing ZeRO shard.)"""
        with self._cond:
            ranks = self._persisted.setdefault(path, set())
            ranks.add(rank)
            if len(ranks) < world:
                return
            del self._persisted[path]
            if checkpoint_step(path) > checkpoint_step(self._latest):
                self._latest = path

    def latest_checkpoint(self) -> str | None:
        with self._cond:
            return self._latest

    def round_done(self, round: int, result: dict[str, Any]) -> None:
        """Rank 0: round `round` trained; `result` has its checkpoint and (in a list, so that
        Ray passes the reference through) the policy weights in the object store."""
        with self._cond:  # (its checkpoint becomes the resume point once every rank's part is in)
            self._finished.add(round)
            self._done[round] = result
            self._cond.notify_all()
