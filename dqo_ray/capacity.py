"""The capacity watch: while a pipeline runs, are the alive nodes still enough for its plan
(`dqo_ray.plan`)? A node lost to a spot preemption can leave Ray waiting silently for
resources; the watch says so, and gives up after ray.resource_wait_s when asked to. It also
logs each node that comes or goes (an autoscaler's work), to the console and run_dir/
nodes.jsonl, which pipeline.md shows. Pure apart from its thread (no Ray: the pipeline hands it
`running_cluster`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dqo_ray.clusters import Cluster, Node, format_number
from dqo_ray.io import append_jsonl
from dqo_ray.plan import Plan, make_plan

if TYPE_CHECKING:
    from dqo_ray.config import Config

log = logging.getLogger(__name__)

NODES_FILE = "nodes.jsonl"
"""run_dir/NODES_FILE: what the autoscaler was asked for and each node that came or left."""
NODE_POLL_S = 2.0
"""How often the watch looks at the node list (a cheap GCS call) for nodes that came or left."""


def record_nodes(run_dir: str | Path, event: str, **fields: Any) -> None:
    """One record of run_dir/nodes.jsonl: `event` (requested, released, came, left) at now."""
    append_jsonl(Path(run_dir) / NODES_FILE, {"time": time.time(), "event": event, **fields})


def describe_resources(node: Node) -> str:
    parts = [f"{format_number(node.cpus)} CPU"] + ([f"{node.gpus} GPU"] if node.gpus else [])
    return ", ".join(parts + [f"{format_number(v)} {k}" for k, v in sorted(node.resources.items())])


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
                 on_give_up: Callable[[], None], run_dir: str | Path | None = None) -> None:
        self.cfg, self.plan, self.cluster_now, self.on_give_up = cfg, plan, cluster_now, on_give_up
        self.run_dir = run_dir
        self.known: dict[str, Node] | None = None  # by name; None until the first look
        self.started = time.monotonic()
        self.short_since: float | None = None
        self.checks_short = 0
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capacity-watch", daemon=True)

    def note_nodes(self, cluster: Cluster) -> list[str]:
        """The nodes that came or left since the last look, logged and recorded (the first
        look records the nodes there at start)."""
        nodes = {n.name: n for n in cluster.nodes}
        first, known = self.known is None, self.known or {}
        changes = [("came", n) for name, n in nodes.items() if name not in known]
        changes += [("left", n) for name, n in known.items() if name not in nodes]
        self.known = nodes
        lines = []
        for event, node in changes:
            after = time.monotonic() - self.started
            what = describe_resources(node)
            if not first:
                lines.append(f"node {event}: {node.name} ({what}), {after:.0f}s after start")
                log.info(lines[-1])
            if self.run_dir is not None:
                record_nodes(self.run_dir, "present" if first else event, node=node.name,
                             resources=what, after_s=round(after, 1))
        return lines

    def check(self, now: float, cluster: Cluster | None = None) -> str | None:
        """One check at monotonic time `now` (of `cluster`, else the one there now): the log
        line it calls for, if any."""
        cluster = cluster or self.cluster_now()
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
        period = self.cfg.ray.resource_check_s
        last_check = time.monotonic()
        while not self._stop.wait(min(NODE_POLL_S, period)) and self.failure is None:
            try:
                cluster = self.cluster_now()
                self.note_nodes(cluster)
                if time.monotonic() - last_check >= period:
                    last_check = time.monotonic()
                    self.check(last_check, cluster)
            except Exception as exc:  # a watch that cannot look (GCS busy) must not end the run
                log.warning("capacity watch: could not read the cluster (%s); trying again", exc)

    def start(self) -> None:
        self.note_nodes(self.cluster_now())  # the nodes there before anything was asked for
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
