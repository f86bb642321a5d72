"""The run's plan: what each role asks Ray for, a per-GPU memory estimate, and whether a cluster
holds them at once. Pure: no Ray, no torch. `python -m jobs.plan` prints it; the pipeline
checks the same plan at start and refuses to begin a run Ray could never schedule (Ray Train
would wait forever for GPUs the generator pool or the evaluator hold).

Roles and what each asks Ray for (as the code that starts them does):

    trainer     trainer.num_workers Ray Train workers: 1 GPU each when trainer.use_gpu, and
                trainer.cpus_per_worker CPUs
    generator   generation.num_engines engine actors: gpus_per_engine GPUs on one node (a
                placement group of {GPU: 1, CPU: 1} bundles when > 1), else cpus_per_engine
    evaluator   one actor: eval.gpus GPUs, eval.cpus CPUs, for the whole run
    reference   data.ref_actors Ray Data actors: 1 GPU each when trainer.use_gpu, else 1 CPU
    ray-data    one Ray Data read task (1 CPU) beside the trainer and the reference actors

Phases: not every role is alive at once.

    reference   reference + ray-data + evaluator + generator (ingested round-0 data only,
                before the trainer starts)
    run         trainer + ray-data + evaluator + generator

The trainer's workers live for the whole run (one Ray Train run for every round), and so do
the engines (which also hold pi_ref and score samples as they are drawn) and the evaluator:
they must all fit at once. pipeline.overlap (sampling round r+1 while round r trains) needs
nothing more; auto is on.

Memory per GPU: `dqo_ray.plan_memory`; disk: `dqo_ray.plan_disk`; clusters: `dqo_ray.clusters`; model sizes:
`dqo_ray.model_shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dqo_ray.clusters import ROLE_RESOURCES, RUNNING, Ask, Cluster, assign, format_number, place
from dqo_ray.model_shapes import ModelShape
from dqo_ray.plan_disk import Disk, check_disk
from dqo_ray.plan_memory import Memory, check_memory, train_engine_name

if TYPE_CHECKING:
    from dqo_ray.config import Config


# -- what each role asks for -----------------------------------------------------------------------


def role_asks(cfg: Config) -> dict[str, Ask]:
    """What each role asks Ray for, exactly as the code that starts it asks."""
    t, g, e, d = cfg.trainer, cfg.generation, cfg.eval, cfg.data

    def marker(role: str) -> str:
        return ROLE_RESOURCES[role] if cfg.ray.role_resources else ""

    asks = {"trainer": Ask("trainer", t.num_workers, 1 if t.use_gpu else 0, t.cpus_per_worker,
                           f"Ray Train workers ({train_engine_name(cfg)})", marker("trainer"),
                           one_node=t.placement == "strict_pack")}
    if uses_generator(cfg):
        if g.gpus_per_engine > 1:  # a placement group of {GPU: 1, CPU: 1} bundles
            gen = Ask("generator", g.num_engines, g.gpus_per_engine, float(g.gpus_per_engine),
                      f"vLLM engines, tensor parallel {g.gpus_per_engine}", marker("generator"))
        else:
            gen = Ask("generator", g.num_engines, g.gpus_per_engine, g.cpus_per_engine,
                      "vLLM engines" if g.gpus_per_engine else "engines on CPUs",
                      marker("generator"))
        asks["generator"] = gen
    asks["evaluator"] = Ask("evaluator", 1, e.gpus, e.cpus, "the evaluator actor (whole run)",
                            marker("evaluator"))
    asks["reference"] = Ask("reference", d.ref_actors, 1 if t.use_gpu else 0,
                            0.0 if t.use_gpu else 1.0, "reference-scoring actors (Ray Data; ingested data only)")
    asks["ray-data"] = Ask("ray-data", 1, 0, 1.0, "a Ray Data read task")
    return asks


def uses_generator(cfg: Config) -> bool:
    """False only when round 0 is ingested and there is no later round to sample."""
    return not (cfg.pipeline.round0 == "ingest" and cfg.pipeline.rounds == 1)


def phases(cfg: Config) -> dict[str, list[Ask]]:
    asks = role_asks(cfg)
    pool = [asks["generator"]] if "generator" in asks else []
    out = {}
    if cfg.pipeline.round0 == "ingest":
        out["reference"] = [asks["reference"], asks["ray-data"], asks["evaluator"], *pool]
    out["run"] = [asks["trainer"], asks["ray-data"], asks["evaluator"], *pool]
    return out


# -- the plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    cluster: Cluster
    shape: ModelShape | None
    asks: dict[str, Ask]
    overlap: bool
    overlap_why: str
    phases: dict[str, list[Ask]]
    memory: list[Memory] = field(default_factory=list)
    disk: Disk | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def refusal(self) -> str:
        """One line per problem."""
        return "\n".join(f"plan refused: {p}" for p in self.problems)

    def render(self, title: str = "") -> str:
        lines = [f"# plan{': ' + title if title else ''}", "",
                 f"cluster: {self.cluster.describe()}"]
        if self.shape is not None:
            lines.append(f"model: {self.shape.name}, {self.shape.params / 1e9:.2f}B parameters "
                         f"(from {self.shape.source})")
        else:
            lines.append("model: size unknown (no config.json there, not in the table of known "
                         "models): GPU memory not estimated")
        lines.append(f"overlap: {'on' if self.overlap else 'off'} ({self.overlap_why})")
        lines += ["", "| role | count | GPUs each | CPUs each | node group | what |",
                  "| --- | ---: | ---: | ---: | --- | --- |"]
        for ask in self.asks.values():
            lines.append(f"| {ask.role} | {ask.count} | {ask.gpus} | {format_number(ask.cpus)} | "
                         f"{self._group(ask)} | {ask.what} |")
        lines += ["", "| phase | at once | GPUs | CPUs |", "| --- | --- | ---: | ---: |"]
        for name, asks in self.phases.items():
            gpus = sum(a.count * a.gpus for a in asks)
            cpus = sum(a.count * a.cpus for a in asks)
            lines.append(f"| {name} | {', '.join(a.role for a in asks)} | {gpus} of "
                         f"{self.cluster.gpus} | {format_number(cpus)} of "
                         f"{format_number(self.cluster.cpus)} |")
        for name, asks in self.phases.items():
            placed, failed = assign(self.cluster, asks)
            lines += ["", f"placement, phase {name} (first fit, as the plan counts it):"]
            lines += [f"- {node.name}: {_counted(roles)}"
                      for node, roles in zip(self.cluster.nodes, placed, strict=True) if roles]
            if failed:
                lines.append(f"- no room for {failed}")
        if self.memory:
            lines += ["", "memory per GPU (GiB, rough):"]
            lines += [f"- {m.describe()}" for m in self.memory]
        if self.disk is not None:
            lines += ["", f"disk (GB, rough): {self.disk.describe()}"]
        if self.notes:
            lines += ["", "notes:"] + [f"- {n}" for n in self.notes]
        lines += ["", "fits: yes" if self.ok else f"fits: no ({len(self.problems)} problem(s))"]
        return "\n".join(lines)

    def _group(self, ask: Ask) -> str:
        if ask.one_node:
            return "all on one node (trainer.placement: strict_pack)"
        if ask.resource:
            return f"nodes with {ask.resource} (ray.role_resources)"
        if ask.gpus:
            kinds = sorted({n.gpu.name for n in self.cluster.nodes
                            if n.gpus >= ask.gpus and n.gpu is not None})
            return (f"GPU nodes ({', '.join(kinds) or 'none here'}, {ask.gpus} GPU(s) on one "
                    "node)")
        return "any node with CPUs (CPU-only nodes first)"


def _counted(roles: list[str]) -> str:
    """["generator", "generator", "evaluator"] -> "generator x2, evaluator"."""
    counts = {r: roles.count(r) for r in dict.fromkeys(roles)}
    return ", ".join(r if n == 1 else f"{r} x{n}" for r, n in counts.items())


def _fit_problems(cfg: Config, cluster: Cluster, shape: ModelShape | None
                  ) -> tuple[list[str], list[Memory], Disk | None, list[str]]:
    """(problems, memory estimates, disk needs, notes) of the plan."""
    problems, notes = [], []
    for name, asks in phases(cfg).items():
        failed = place(cluster, asks)
        if failed:
            gpus = sum(a.count * a.gpus for a in asks)
            cpus = sum(a.count * a.cpus for a in asks)
            largest = max((n.gpus for n in cluster.nodes), default=0)
            problems.append(
                f"phase {name} needs {' + '.join(str(a) for a in asks)} = {gpus} GPUs, "
                f"{format_number(cpus)} CPUs at once; {cluster.label} has {cluster.gpus} GPUs "
                f"(at most {largest} on a node), {format_number(cluster.cpus)} CPUs: no node has "
                f"room for {failed}")
    memory = check_memory(cfg, cluster, shape, role_asks(cfg), problems, notes)
    disk = check_disk(cfg, cluster, shape, problems, notes)
    return problems, memory, disk, notes


def make_plan(cfg: Config, cluster: Cluster, shape: ModelShape | None) -> Plan:
    """The plan of `cfg` on `cluster`; pipeline.overlap auto is decided here."""
    mode = cfg.pipeline.overlap
    overlap = mode != "off"
    why = {"on": "pipeline.overlap: on", "off": "pipeline.overlap: off",
           "auto": "auto: the trainer, the engines and the evaluator are all held for the "
                   "run"}[mode]
    problems, memory, disk, notes = _fit_problems(cfg, cluster, shape)
    if problems and cluster.label == RUNNING:
        notes.append("an autoscaling cluster starts its nodes on demand: plan for the cluster it "
                     "grows to with --cluster / ray.cluster (e.g. 2x8xH100-80GB)")
    if cfg.generation.gpus_per_engine > 1:
        notes.append("generation.gpus_per_engine > 1: the engine actor holds no GPU of its own "
                     "(its tensor-parallel workers do), so pi_ref scores its samples on CPUs: "
                     "slow for large models (a known limit)")
    if cfg.eval.gpus > 1:
        notes.append(f"eval.gpus: {cfg.eval.gpus} are held but the evaluator's engine uses one "
                     "(it runs without tensor parallelism)")
    if cfg.pipeline.warm_start.enabled:
        notes.append("the warm start trains in the driver process, on its CPUs, before anything "
                     "else starts")
    return Plan(cluster, shape, role_asks(cfg), overlap, why, phases(cfg), memory, disk,
                problems, notes)
