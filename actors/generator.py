"""GeneratorPool: Ray actors holding generation engines (vLLM, HF fallback) that sample
responses, grade them, optionally add Monte-Carlo process rewards, and write trajectories.

    pool = GeneratorPool(cfg, checkpoint)          # N engine actors
    summary = pool.generate(items, round=1, policy_version=1, store=store)
    pool.load_weights(new_checkpoint)              # in place, no restart

Work is handed out in chunks of `generation.chunk_prompts` prompts, one chunk in flight per
actor, so fast actors take more chunks. An actor that dies is replaced (with the current
weights) and its chunk re-issued. Trajectory ids are a function of (round, prompt_id, sample
index) and a prompt's samples are always written together, so a re-issued chunk or a resumed
run can never duplicate a trajectory: prompts already in the store for the round are skipped.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from actors.engines import SamplingSpec, make_engine
from dqo_ray.algo.process_rewards import shaped_step_rewards, step_ends
from dqo_ray.config import Config
from dqo_ray.data.store import TrajectoryStore
from dqo_ray.models import load_tokenizer
from dqo_ray.models.weight_broadcast import BroadcastSeat, WeightOffer, seats
from dqo_ray.runtime import node_info, node_name
from dqo_ray.storage import CheckpointNotVisible, require_visible
from dqo_ray.tasks import configure_grading, grade_many
from dqo_ray.tasks.items import PromptItem, within_prompt_limit

log = logging.getLogger(__name__)


def traj_id_for(round: int, prompt_id: str, sample_index: int) -> str:
    digest = hashlib.sha1(prompt_id.encode()).hexdigest()[:16]
    return f"r{round}-{digest}-{sample_index}"


def _chunk_seed(base: int, round: int, items: Sequence[PromptItem]) -> int:
    """Per-chunk seed from its round and prompts: reproducible, and different across chunks
    and rounds (a round sampled from the same policy as the last must not repeat it)."""
    digest = hashlib.sha1("\x1f".join([str(round), *(i.prompt_id for i in items)]).encode()
                          ).digest()
    return (base + int.from_bytes(digest[:4], "little")) % 2**31


class EngineWorker:
    """The body of one engine actor: sample, grade, score process rewards, build rows."""

    def __init__(self, cfg: Config, model_path: str, reference: str | None = None) -> None:
        self.cfg, self.gen = cfg, cfg.generation
        require_visible(model_path, node_name(), "an engine")
        self.engine = make_engine(self.gen.engine, model_path, kv_cache_gb=self.gen.kv_cache_gb,
                                  seed=self.gen.seed, dtype=cfg.model.dtype,
                                  tensor_parallel=max(1, self.gen.gpus_per_engine),
                                  in_process=self.gen.vllm_in_process,
                                  **self.gen.vllm_memory)
        self.tokenizer = load_tokenizer(model_path)
        self.load_error: Exception | None = None
        # With generation.chunks_in_flight > 1 the actor runs that many calls at once: one
        # chunk is sampled (the engine: one caller at a time) while the one before is graded
        # and scored with pi_ref, so the engine does not idle through them.
        self._sampling, self._finishing = threading.Lock(), threading.Lock()
        configure_grading(cfg.grading)  # this actor's math_verify pool
        self.reference = None  # pi_ref, resident: each chunk is scored as it is sampled
        if reference is not None:
            from dqo_ray.models.reference import ReferenceModel

            require_visible(reference, node_name(), "an engine's reference model")
            device = "cuda" if torch.cuda.is_available() and self.gen.gpus_per_engine == 1 \
                else "cpu"
            self.reference = ReferenceModel(reference, self.tokenizer.pad_token_id, device,
                                            cfg.data.ref_batch_size)

    def ping(self) -> int:
        return os.getpid()

    def where(self) -> dict[str, Any]:
        return node_info()

    def load_weights(self, checkpoint_dir: str,
                     weights: bytes | BroadcastSeat | None = None) -> float:
        """From `weights` (the trainer's, in memory or by broadcast) when given, else the
        folder; returns the seconds it took. A failed refresh leaves the engine on old (or
        half-loaded) weights: remembered, so that no later chunk is sampled from them."""
        start = time.perf_counter()
        try:
            if weights is None:
                require_visible(checkpoint_dir, node_name(), "an engine")
            with self._sampling:
                self.engine.load_weights(checkpoint_dir if weights is None else weights)
        except Exception as exc:
            self.load_error = exc
            raise
        self.load_error = None
        return time.perf_counter() - start

    def run_chunk(self, items: Sequence[PromptItem], round: int,
                  policy_version: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        if self.load_error is not None:
            raise self.load_error
        start, gen = time.perf_counter(), self.gen
        spec = SamplingSpec(n=gen.samples_per_prompt, temperature=gen.temperature,
                            top_p=gen.top_p, max_new_tokens=gen.max_new_tokens,
                            seed=_chunk_seed(gen.seed, round, items), stop=items[0].stop)
        with self._sampling:
            began = time.perf_counter()  # (not the wait for the engine)
            samples = self.engine.generate([list(i.prompt_ids) for i in items], spec)
            sampled_s = time.perf_counter() - began
        with self._finishing:
            rows, stats = self._finish_chunk(items, samples, round, policy_version)
        stats.update(seconds=time.perf_counter() - start, sample_seconds=sampled_s)
        return rows, stats

    def _finish_chunk(self, items: Sequence[PromptItem], samples: list, round: int,
                      policy_version: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """A sampled chunk's rows: graded, with process rewards and pi_ref's log-probs."""
        gen, algo = self.gen, self.cfg.algo
        flat = [(item, j, s) for item, group in zip(items, samples, strict=True)
                for j, s in enumerate(group)]
        correct = grade_many(items[0].task, [s.text for _, _, s in flat],
                             [item.gold for item, _, _ in flat])
        rows = []
        for (item, j, sample), ok in zip(flat, correct, strict=True):
            rows.append(dict(
                traj_id=traj_id_for(round, item.prompt_id, j), prompt_id=item.prompt_id,
                round=round, policy_version=policy_version, dataset=item.dataset,
                prompt=item.prompt, response=sample.text, prompt_ids=list(item.prompt_ids),
                response_ids=list(sample.token_ids), behaviour_logprobs=list(sample.logprobs),
                reward=algo.reward_correct if ok else algo.reward_incorrect, correct=ok,
                finish_reason=sample.finish_reason, step_ends=None, step_rewards=None,
                step_values=None, ref_logprobs=None))
        if gen.process_reward_samples > 0:
            self._add_process_rewards(items, rows)
        stats = {"tokens": sum(len(r["response_ids"]) for r in rows), "ref_seconds": 0.0}
        if self.reference is not None:
            began = time.perf_counter()
            scores = self.reference.logprobs([r["prompt_ids"] for r in rows],
                                             [r["response_ids"] for r in rows])
            for row, score in zip(rows, scores, strict=True):
                row["ref_logprobs"] = score.tolist()
            stats["ref_seconds"] = time.perf_counter() - began
        return rows, stats

    def _add_process_rewards(self, items: Sequence[PromptItem], rows: list[dict]) -> None:
        """p_0 from m completions of the prompt; p_k from m completions of each step prefix;
        p_K = the graded outcome. Completions get the full max_new_tokens budget."""
        gen = self.gen
        m = gen.process_reward_samples
        by_prompt = {item.prompt_id: item for item in items}
        prefixes: list[list[int]] = []  # prompt_ids (+ response prefix) to complete
        prefix_text: list[str] = []  # response text already written in the prefix
        golds: list[str] = []
        owners: list[tuple[str, int | None, int]] = []  # (prompt_id | traj_id, row, step)
        for item in items:
            prefixes.append(list(item.prompt_ids))
            prefix_text.append("")
            golds.append(item.gold)
            owners.append((item.prompt_id, None, 0))
        ends_by_row = []
        for r, row in enumerate(rows):
            texts = [self.tokenizer.decode([t]) for t in row["response_ids"]]
            ends = step_ends(texts, gen.step_delimiter)
            ends_by_row.append(ends)
            for k, end in enumerate(ends[:-1], start=1):  # the last step's value is the outcome
                ids = row["response_ids"][: end + 1]
                prefixes.append(row["prompt_ids"] + ids)
                prefix_text.append(self.tokenizer.decode(ids, skip_special_tokens=True))
                golds.append(by_prompt[row["prompt_id"]].gold)
                owners.append((row["traj_id"], r, k))
        # Values are estimated by sampling, even when the main responses were greedy.
        spec = SamplingSpec(n=m, temperature=gen.temperature or 1.0, top_p=gen.top_p,
                            max_new_tokens=gen.max_new_tokens,
                            seed=_chunk_seed(gen.seed + 1, rows[0]["round"], items),
                            stop=items[0].stop)
        with self._sampling:
            completions = self.engine.generate(prefixes, spec)
        texts = [prefix_text[i] + c.text for i, group in enumerate(completions) for c in group]
        grades = grade_many(items[0].task, texts, [g for g in golds for _ in range(m)])
        value = [sum(grades[i * m:(i + 1) * m]) / m for i in range(len(prefixes))]
        p0 = {owners[i][0]: value[i] for i in range(len(items))}
        step_values: dict[int, dict[int, float]] = collections.defaultdict(dict)
        for i in range(len(items), len(prefixes)):
            _, r, k = owners[i]
            step_values[r][k] = value[i]
        for r, row in enumerate(rows):
            ends = ends_by_row[r]
            values = [p0[row["prompt_id"]]]
            values += [step_values[r][k] for k in range(1, len(ends))]
            values.append(1.0 if row["correct"] else 0.0)
            row["step_ends"] = ends
            row["step_values"] = values[:-1]  # p_{k-1}: success rate where step k starts
            row["step_rewards"] = shaped_step_rewards(values, gen.process_reward_alpha)


def _raise_unreadable(exc: ray.exceptions.RayTaskError, what: str) -> None:
    """An engine that cannot see a checkpoint: one clear error (path, node, what to do)
    instead of the actor's traceback; anything else is left to the caller."""
    if isinstance(exc.cause, CheckpointNotVisible):
        raise CheckpointNotVisible(f"{what}: {exc.cause}") from None


def _raise_if_cannot_start(exc: ray.exceptions.RayActorError, slot: int) -> None:
    """A replacement that failed in its constructor would fail again: no endless respawns."""
    if exc.actor_init_failed:
        raise RuntimeError(f"engine {slot} cannot start: {exc}") from None


@dataclass
class GenerationSummary:
    prompts: int
    samples: int
    skipped_prompts: int  # already in the store for this round (resume)
    accuracy: float
    mean_response_tokens: float
    tokens_per_s: float
    seconds: float
    replaced_actors: int
    shards: list[str] = field(default_factory=list)
    ref_seconds: float = 0.0  # engine time spent scoring the samples with pi_ref
    sampling_share: float = 0.0
    """Of the engines' wall time, the share spent sampling (generate calls): the rest is each
    chunk's grading and pi_ref scoring, and waiting for work."""

    def __str__(self) -> str:
        return (f"prompts {self.prompts} (skipped {self.skipped_prompts} already stored), "
                f"samples {self.samples}, accuracy {self.accuracy:.3f}, mean length "
                f"{self.mean_response_tokens:.1f} tokens, {self.tokens_per_s:.0f} tokens/s, "
                f"{self.seconds:.1f}s (engines sampling {100 * self.sampling_share:.0f}% of it; "
                f"pi_ref scoring {self.ref_seconds:.1f}s of engine time), "
                f"actors replaced {self.replaced_actors}, shards {len(self.shards)}")


class GeneratorPool:
    """N EngineWorker actors; see the module docstring."""

    def __init__(self, cfg: Config, model_path: str, reference: str | None = None) -> None:
        """reference: pi_ref's checkpoint; when given, every engine holds it for the pool's
        life and the rows it returns carry ref_logprobs (no reference stage after sampling)."""
        self.cfg, self.model_path, self.weights = cfg, model_path, model_path
        self.reference = reference
        self.replaced = 0
        self.groups: dict[int, Any] = {}  # slot -> its tensor-parallel placement group
        self.actors = [self._spawn(slot) for slot in range(cfg.generation.num_engines)]
        ray.get([a.ping.remote() for a in self.actors])  # fail fast if an engine cannot start

    def _release_group(self, slot: int) -> None:
        """A replaced (dead) engine's placement group would hold its GPUs for the whole run."""
        group = self.groups.pop(slot, None)
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)

    def _spawn(self, slot: int) -> Any:
        self._release_group(slot)
        gen = self.cfg.generation
        marker = self.cfg.ray.role_resource("generator")
        options: dict[str, Any] = {"num_cpus": gen.cpus_per_engine, "max_restarts": 0,
                                   "resources": marker, "max_concurrency": gen.chunks_at_once}
        if gen.placement == "spread":
            options["scheduling_strategy"] = "SPREAD"
        if gen.gpus_per_engine == 1:
            options["num_gpus"] = 1
        elif gen.gpus_per_engine > 1:
            # Tensor parallel: reserve the engine's GPUs as one placement group; vLLM starts its
            # TP workers inside it (distributed executor "ray"). Not exercised on CPU machines.
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # STRICT_PACK: one node (the default PACK may split a group over nodes when one
            # has no room, and tensor parallelism over the network is slow).
            # The role's marker in the first bundle: STRICT_PACK puts the rest beside it.
            group = placement_group([{"GPU": 1, "CPU": 1, **marker}]
                                    + [{"GPU": 1, "CPU": 1}] * (gen.gpus_per_engine - 1),
                                    strategy="STRICT_PACK")
            ray.get(group.ready())
            self.groups[slot] = group
            options.update(num_cpus=0, resources={}, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_capture_child_tasks=True))
        # Built from the weights the pool holds now (a replaced engine: the last refresh's
        # checkpoint folder), so that no chunk can be sampled before they are loaded.
        return ray.remote(EngineWorker).options(**options).remote(self.cfg, self.weights,
                                                                  self.reference)

    def load_weights(self, checkpoint_dir: str, weights: Any = None) -> float:
        """Refreshes every engine's weights in place (vLLM: reload + prefix-cache reset) to
        the policy of `checkpoint_dir`: from `weights` when given, no disk involved (an
        ObjectRef of the trainer's safetensors bytes, or a `WeightOffer` to receive by
        broadcast), else from the folder. The folder is what a replaced engine loads, and the
        fallback when the trainer's weights are out of reach (their owner, a trainer worker,
        died; a broadcast failed). Returns the seconds the refresh took."""
        start = time.perf_counter()
        self.weights = checkpoint_dir
        if isinstance(weights, WeightOffer):  # every engine at once: they form one group
            sources: list[Any] = seats(weights, len(self.actors),
                                       max(1, self.cfg.generation.gpus_per_engine))
        else:
            sources = [weights] * len(self.actors)
        refs = [actor.load_weights.remote(checkpoint_dir, source)
                for actor, source in zip(self.actors, sources, strict=True)]
        for i, ref in enumerate(refs):
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                _raise_if_cannot_start(exc, i)
                log.warning("engine %d died during the weight refresh; replacing it", i)
                self.actors[i] = self._spawn(i)
                self.replaced += 1
            except ray.exceptions.RayTaskError as exc:
                _raise_unreadable(exc, f"weight refresh of engine {i}")
                if not isinstance(weights, WeightOffer):
                    raise
                log.warning("engine %d: the trainer's broadcast failed (%s); loading %s", i,
                            exc.cause, checkpoint_dir)
                ray.get(self.actors[i].load_weights.remote(checkpoint_dir))
            except ray.exceptions.ObjectLostError:  # the bytes' owner is gone: use the folder
                log.warning("engine %d: the trainer's weights are gone from the object store; "
                            "loading %s", i, checkpoint_dir)
                ray.get(self.actors[i].load_weights.remote(checkpoint_dir))
        seconds = time.perf_counter() - start
        log.info("weights refreshed from %s in %.2fs", "memory" if weights is not None
                 else checkpoint_dir, seconds)
        return seconds

    def generate(self, items: Sequence[PromptItem], round: int, policy_version: int,
                 store: TrajectoryStore, shard_rows: int = 2048,
                 on_chunk: Callable[[int, GeneratorPool], None] | None = None
                 ) -> GenerationSummary:
        """Samples every prompt not yet stored for `round` (those longer than
        data.max_prompt_tokens are left out, logged); writes shards as chunks complete."""
        start = time.perf_counter()
        items = within_prompt_limit(items, self.cfg.data.max_prompt_tokens)
        n = self.cfg.generation.samples_per_prompt
        stored = store.traj_ids([round])
        todo = [i for i in items if traj_id_for(round, i.prompt_id, 0) not in stored]
        size = self.cfg.generation.chunk_prompts
        pending = collections.deque(todo[k:k + size] for k in range(0, len(todo), size))
        inflight: dict[Any, tuple[int, list[PromptItem], Any]] = {}  # ref -> slot, chunk, actor
        sampling_s = 0.0
        buffer: list[dict] = []
        seen: set[str] = set()
        summary = GenerationSummary(len(todo), 0, len(items) - len(todo), 0.0, 0.0, 0.0, 0.0, 0)
        correct = tokens = chunks_done = 0
        replaced_before = self.replaced

        def submit(slot: int) -> None:
            if pending:
                chunk, actor = pending.popleft(), self.actors[slot]
                inflight[actor.run_chunk.remote(chunk, round, policy_version)] = \
                    (slot, chunk, actor)

        def flush() -> None:
            if buffer:
                summary.shards.append(store.write_shard(list(buffer), round=round).name)
                buffer.clear()

        for _ in range(self.cfg.generation.chunks_at_once):
            for slot in range(len(self.actors)):
                submit(slot)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            slot, chunk, actor = inflight.pop(ref)
            try:
                rows, stats = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # (an actor's death is not one)
                _raise_unreadable(exc, f"engine {slot}")
                raise
            except ray.exceptions.RayActorError as exc:
                pending.appendleft(chunk)
                if self.actors[slot] is actor:  # (its other chunks in flight fail too: once)
                    _raise_if_cannot_start(exc, slot)
                    log.warning("engine %d died (%s); replacing it and re-issuing its prompts",
                                slot, type(exc).__name__)
                    self.actors[slot] = self._spawn(slot)
                    self.replaced += 1
                submit(slot)
                continue
            fresh = [r for r in rows if r["traj_id"] not in seen]
            seen.update(r["traj_id"] for r in fresh)
            buffer.extend(fresh)
            summary.samples += len(fresh)
            summary.ref_seconds += stats.get("ref_seconds", 0.0)
            sampling_s += stats.get("sample_seconds", 0.0)
            correct += sum(r["correct"] for r in fresh)
            tokens += sum(len(r["response_ids"]) for r in fresh)
            chunks_done += 1
            if len(buffer) >= shard_rows:
                flush()
            elapsed = time.perf_counter() - start
            done = summary.samples // n
            log.info("generation round %d: %d/%d prompts, %d samples, %.0f tokens/s, ETA %.0fs",
                     round, done, len(todo), summary.samples, tokens / elapsed,
                     (len(todo) - done) * elapsed / max(done, 1))
            if on_chunk is not None:
                on_chunk(chunks_done, self)
            submit(slot)
        flush()
        summary.seconds = time.perf_counter() - start
        summary.accuracy = correct / max(summary.samples, 1)
        summary.mean_response_tokens = tokens / max(summary.samples, 1)
        summary.tokens_per_s = tokens / max(summary.seconds, 1e-9)
        summary.sampling_share = sampling_s / max(summary.seconds * len(self.actors), 1e-9)
        summary.replaced_actors = self.replaced - replaced_before
        return summary

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        for slot in list(self.groups):
            self._release_group(slot)
        self.actors = []
