"""The capacity watch: while a pipeline runs, are the alive nodes still enough for its plan
(`dqo_ray.plan`)? A node lost to a spot preemption can leave Ray waiting silently for
resources; the watch says so, and gives up after ray.resource_wait_s when asked to. Pure apart
from its thread (no Ray: the pipeline hands it `running_cluster`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dqo_ray.clusters import Cluster
from dqo_ray.plan import Plan, make_plan

if TYPE_CHECKING:
    from dqo_ray.config import Config

log = logging.getLogger(__name__)


def shortfall(cfg: Config, plan: Plan, now: Cluster) -> str | None:
    """Why the cluster `now` no longer holds the run that `plan` started (None: it does):
    a role that no longer fits, or roles that ran at once and no longer fit together."""
    later = make_plan(cfg, now, plan.shape)
    if not later.ok:
        return "; ".join(later.problems)
    if plan.overlap and not later.overlap:
        return f"the roles that run at once no longer fit together ({later.overlap_why})"
    return None


class CapacityWatch:
    """Every ray.resource_check_s, compares the alive nodes (`cluster_now`) with the run's
    plan. A node lost (a spot preemption, a drained node) that leaves too little makes Ray wait
    without a word; this says so once, then every tenth check, and after ray.resource_wait_s
    (0 = never) gives up: `failure` is set and `on_give_up` called (the pipeline stops its
    driver). Tests drive `check` directly."""

    def __init__(self, cfg: Config, plan: Plan, cluster_now: Callable[[], Cluster],
                 on_give_up: Callable[[], None]) -> None:
        self.cfg, self.plan, self.cluster_now, self.on_give_up = cfg, plan, cluster_now, on_give_up
        self.short_since: float | None = None
        self.checks_short = 0
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capacity-watch", daemon=True)

    def check(self, now: float) -> str | None:
        """One check at monotonic time `now`: the log line it calls for, if any."""
        cluster = self.cluster_now()
        why = shortfall(self.cfg, self.plan, cluster)
        wait_s = self.cfg.ray.resource_wait_s
        if why is None:
            if self.short_since is None:
                return None
            line = f"the cluster holds the run again: {cluster.describe()}"
            self.short_since, self.checks_short = None, 0
            log.info(line)
            return line
        if self.short_since is None:
            self.short_since = now
        waited = now - self.short_since
        if wait_s and waited >= wait_s:
            self.failure = (f"the cluster could not hold this run for {waited:.0f}s "
                            f"(ray.resource_wait_s={wait_s:g}): {why}; now "
                            f"{cluster.describe()}. Re-submit the same command to resume.")
            log.error(self.failure)
            self.on_give_up()
            return self.failure
        self.checks_short += 1
        if self.checks_short % 10 != 1:
            return None
        line = (f"waiting for resources ({waited:.0f}s so far): {why}; now "
                f"{cluster.describe()} (a node lost? the autoscaler or a replacement node brings "
                "it back; " + (f"giving up after {wait_s:g}s)" if wait_s else
                               "ray.resource_wait_s > 0 gives up after that long)"))
        log.warning(line)
        return line

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.ray.resource_check_s) and self.failure is None:
            try:
                self.check(time.monotonic())
            except Exception as exc:  # a watch that cannot look (GCS busy) must not end the run
                log.warning("capacity watch: could not read the cluster (%s); trying again", exc)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
