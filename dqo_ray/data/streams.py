"""Ray Data pipelines over the trajectory store: reference scoring and training streams.

    reference stage   (ingested data only: sampled rows are scored by the engines that sample
                      them) read_parquet(shards lacking ref_logprobs) -> map_batches(
                      ReferenceScorer, actor pool, GPU when present) -> driver merges per
                      shard -> store.replace_shard (pi_ref runs once per trajectory)
    training stream   EpochPlanner actor, one for the run, once per (round, epoch) for all
                      ranks: read_parquet(the round's data rounds) -> map_batches(mix rounds,
                      order keys) -> sort(order key) -> materialize -> split(world,
                      equal=True); a round's epoch 0 is built as soon as its data is stored,
                      epoch e+1 while e trains. Up to data.epoch_in_process_rows rows the
                      same epoch is built with pyarrow in the planner (`epoch_table`) and
                      handed out as a Dataset.
                      DPO (pairs=True): ... -> groupby(prompt_id) -> map_groups(
                      preference_pairs) -> sort(order key, pair_pos) -> split into
                      contiguous ranges of even length (pairs never cut).
                      Rank r: its split -> iter_torch_batches(TrajectoryCollate) -> micro-batches
                      grouped per global step (see train/loop.py for the accounting)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.context import ShuffleStrategy

from dqo_ray.data.batch import pad_trajectories
from dqo_ray.data.groups import balanced_groups
from dqo_ray.data.order import copies_per_row, order_keys
from dqo_ray.data.pairs import preference_pairs
from dqo_ray.data.store import ShardInfo, TrajectoryStore

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ["traj_id", "round", "prompt_ids", "response_ids", "behaviour_logprobs",
                 "ref_logprobs", "reward", "correct", "finish_reason", "step_ends",
                 "step_rewards", "step_values"]


ROWS_PER_PARTITION = 50_000  # rows per shuffle partition of an epoch's sort and groupby


def _deterministic_context() -> None:
    # Blocks must come out in order for the epoch order (and so resume) to be exact.
    ray.data.DataContext.get_current().execution_options.preserve_order = True


# ------------------------------------------------------------------------------------------
# Training stream
# ------------------------------------------------------------------------------------------

class MixAndKey:
    """map_batches fn: repeats rows by round weight and adds the epoch order key."""

    def __init__(self, weights: Mapping[int, float], seed: int, epoch: int) -> None:
        self.weights, self.seed, self.epoch = dict(weights), seed, epoch

    def __call__(self, table: pa.Table) -> pa.Table:
        traj_ids = table.column("traj_id").to_pylist()
        copies = copies_per_row(traj_ids, table.column("round").to_pylist(), self.weights,
                                self.seed, self.epoch)
        index = np.repeat(np.arange(len(traj_ids)), copies)
        copy_no = np.concatenate([np.arange(c) for c in copies]) if len(copies) else index
        out = table.take(pa.array(index, type=pa.int64()))
        keys = order_keys([traj_ids[i] for i in index], copy_no, self.seed, self.epoch)
        return out.append_column("order_key", pa.array(keys, type=pa.int64()))


def epoch_table(table: pa.Table, weights: Mapping[int, float], seed: int, epoch: int,
                pairs: bool = False, balanced: bool = False) -> pa.Table:
    """`epoch_dataset` for rows that fit one process: the same selection and order, with
    pyarrow alone (balanced_groups and preference_pairs take a table of many prompts)."""
    table = MixAndKey(weights, seed, epoch)(table)
    if pairs:
        return preference_pairs(table, seed, epoch).sort_by([("order_key", "ascending"),
                                                            ("pair_pos", "ascending")])
    if balanced:
        table = balanced_groups(table, seed, epoch)
    return table.sort_by("order_key")


def epoch_dataset(store: TrajectoryStore, shards: Sequence[ShardInfo],
                  weights: Mapping[int, float], seed: int, epoch: int,
                  pairs: bool = False, balanced: bool = False) -> ray.data.Dataset:
    """The mixed, ordered rows of one epoch (lazy). pairs=True (DPO): only interleaved
    (chosen, rejected) rows of the same prompt (`dqo_ray.data.pairs`); balanced=True: only
    balanced outcome groups (`dqo_ray.data.groups`)."""
    _deterministic_context()
    # Ray's default of 200 shuffle partitions (the sort's, and the groupby's) cost 30-80 s for a
    # few thousand rows on 2 CPUs: partitions grow with the data instead; and the sort-based
    # shuffle starts no aggregator actors (one noisy measurement: 5-6 s an epoch against 8-9).
    context = ray.data.DataContext.get_current()
    partitions = max(1, math.ceil(sum(s.num_rows for s in shards) / ROWS_PER_PARTITION))
    context.default_hash_shuffle_parallelism = partitions
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    columns = TRAIN_COLUMNS + ["prompt_id"] if pairs or balanced else TRAIN_COLUMNS
    ds = ray.data.read_parquet(store.paths(shards), filesystem=store.filesystem,
                               columns=columns, partitioning=None)
    ds = ds.map_batches(MixAndKey(weights, seed, epoch), batch_format="pyarrow")
    if not (pairs or balanced):
        return ds.sort("order_key")
    # A prompt's rows may sit in any block: group them first, then select within the group.
    ds = ds.groupby("prompt_id", num_partitions=partitions).map_groups(
        preference_pairs if pairs else balanced_groups, batch_format="pyarrow",
        fn_kwargs={"seed": seed, "epoch": epoch})
    return ds.sort(["order_key", "pair_pos"] if pairs else "order_key")


class TrajectoryCollate(NumpyBatchCollateFn):
    """Ragged numpy rows -> padded tensors (dqo_ray.data.batch.pad_trajectories)."""

    def __init__(self, pad_id: int, side: str = "right", pad_to_multiple: int = 8) -> None:
        self.pad_id, self.side, self.pad_to_multiple = pad_id, side, pad_to_multiple

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        n = len(batch["traj_id"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        out = pad_trajectories(rows, self.pad_id, self.side, self.pad_to_multiple)  # type: ignore[arg-type]
        out["order_key"] = torch.as_tensor(batch["order_key"].astype(np.int64))
        return out


class EpochPlanner:
    """Builds each epoch's ordered data once for all ranks and hands out equal splits.

    Run as a Ray actor (`planner_actor`) that lives for the whole run: `plan_round(r, rounds)`
    names the data rounds training round r reads and starts building its first epoch at once
    (the pipeline calls it as soon as round r's data is stored, so the build overlaps the
    previous round's training); the constructor's `rounds` plan round 0. One shuffle per epoch
    instead of one per rank, and epoch e+1 is built in the background while e trains. The
    epoch is materialised in the object store (spilled to disk when large); only the current
    and the next epoch of the newest rounds are kept. `split(equal=True)` drops at most
    world-1 rows so that every rank gets the same number of steps; with pairs, each rank gets
    the same even number of rows and at most world-1 pairs drop. `run_rows` (rows one round
    consumes) stops the prefetch past the last epoch the round reaches, estimated from the
    current epoch's size: a wrong guess costs latency only.
    """

    def __init__(self, store_root: str, rounds: Sequence[int] | None,
                 weights: Mapping[int, float], seed: int, world_size: int,
                 pairs: bool = False, run_rows: int | None = None,
                 balanced: bool = False, in_process_rows: int = 0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = TrajectoryStore(store_root)
        self.weights, self.seed, self.world_size = dict(weights), seed, world_size
        self.pairs, self.run_rows, self.balanced = pairs, run_rows, balanced
        self.in_process_rows = in_process_rows
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-planner")
        self._shards: dict[int, list[ShardInfo]] = {}  # training round -> its shards
        self._rounds: dict[int, list[int] | None] = {}  # training round -> its data rounds
        self._builds: dict[tuple[int, int], Any] = {}  # (round, epoch) -> future splits
        self._lock = threading.Lock()
        self.plan_round(0, rounds, prefetch=False)

    def plan_round(self, round: int, rounds: Sequence[int] | None, prefetch: bool = True,
                   epoch: int = 0) -> None:
        """Training round `round` reads data `rounds` (None: every round in the store, as
        committed now); starts building its epoch `epoch` unless prefetch=False."""
        with self._lock:
            self._shards[round] = self.store.shards(rounds)
            self._rounds[round] = list(rounds) if rounds is not None else None
            for old in [r for r in self._shards if r < round - 1]:
                del self._shards[old], self._rounds[old]
        if prefetch:
            self._future(round, epoch)

    def _build(self, round: int, epoch: int) -> list[Any]:
        start = time.perf_counter()
        shards = self._shards[round]
        if sum(s.num_rows for s in shards) <= self.in_process_rows:
            # Small: Ray Data's tasks and shuffles would cost more than the work (seconds).
            columns = TRAIN_COLUMNS + (["prompt_id"] if self.pairs or self.balanced else [])
            table = epoch_table(self.store.read_table(shards, columns), self.weights,
                                self.seed, epoch, self.pairs, self.balanced)
            rows = self._check_rows(table.num_rows, epoch, shards)
            splits = [ray.data.from_arrow(table.slice(first, length))
                      for first, length in self._rank_ranges(rows)]
        else:
            ds = epoch_dataset(self.store, shards, self.weights, self.seed, epoch,
                               self.pairs, self.balanced).materialize()
            rows = self._check_rows(ds.count(), epoch, shards)
            if self.pairs:
                ranges = self._rank_ranges(rows)
                splits = ds.split_at_indices([a + n for a, n in ranges])[:self.world_size]
            else:
                splits = ds.split(self.world_size, equal=True)
        for split in splits:
            # The trainers read their rows in the planned order (the ledger, exact resume):
            # without this, Ray Data may hand a reader its batches out of order.
            split.context.execution_options.preserve_order = True
        log.info("round %d epoch %d: %d rows ordered and split %d ways in %.1fs", round, epoch,
                 rows, self.world_size, time.perf_counter() - start)
        return splits

    def _check_rows(self, rows: int, epoch: int, shards: Sequence[ShardInfo]) -> int:
        if self.pairs and rows == 0:
            raise ValueError(f"epoch {epoch}: no preference pair in the store's rounds "
                             f"{sorted({s.round for s in shards})}: DPO needs prompts "
                             "with both a correct and an incorrect response")
        return rows

    def _rank_ranges(self, rows: int) -> list[tuple[int, int]]:
        """(first row, rows) of each rank: contiguous and equal, at most world-1 rows left
        over. With pairs, of an even length each: no pair is cut between ranks (and an even
        micro_batch_size keeps them whole within a rank's batches)."""
        unit = 2 if self.pairs else 1
        per_rank = rows // (unit * self.world_size) * unit
        return [(r * per_rank, per_rank) for r in range(self.world_size)]

    def _future(self, round: int, epoch: int) -> Any:
        with self._lock:
            key = (round, epoch)
            build = self._builds.get(key)
            if build is None or (build.done() and build.exception() is not None):
                # A failed build is not kept: the next ask (a restarted trainer) rebuilds it.
                self._builds[key] = self._pool.submit(self._build, round, epoch)
            for old in [k for k in self._builds
                        if k[0] < round - 1 or (k[0] == round and k[1] < epoch - 1)]:
                del self._builds[old]  # ranks move in lockstep; a restart rebuilds (same order)
            return self._builds[key]

    def prefetch(self, epoch: int, round: int = 0) -> None:
        """Starts building `epoch` of `round` now (e.g. while the trainers start up)."""
        self._future(round, epoch)

    def planned_epochs(self, round: int = 0) -> list[int]:
        """Epochs of `round` built or being built (the current one and at most the next)."""
        with self._lock:
            return sorted(e for r, e in self._builds if r == round)

    def split(self, epoch: int, rank: int, round: int = 0,
              rounds: Sequence[int] | None = None) -> Any:
        """Rank `rank`'s part of epoch `epoch` of `round` (a materialised Dataset); prefetches
        epoch+1. `rounds`: the round's data rounds, for a planner that has not planned it
        (restarted after its node was lost). A build that lost a Ray worker or object (its
        node gone) is built again, up to 3 times."""
        if round not in self._shards or (rounds is not None
                                         and list(rounds) != self._rounds.get(round)):
            self.plan_round(round, rounds, prefetch=False)
        for attempt in range(3):
            try:
                splits = self._future(round, epoch).result()
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                if attempt == 2:
                    raise
                log.warning("round %d epoch %d: the build lost a Ray worker or object (%s: a "
                            "node gone?); building it again", round, epoch, type(exc).__name__)
        epoch_rows = sum(s.count() for s in splits)
        if self.run_rows is None or (epoch + 1) * epoch_rows < self.run_rows:
            self._future(round, epoch + 1)
        return splits[rank]

    def close(self) -> None:
        """Waits for a background build (a planner used in-process must not leave one running
        past its Ray session)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def planner_actor(store_root: str, rounds: Sequence[int] | None, weights: Mapping[int, float],
                  seed: int, world_size: int, pairs: bool = False,
                  run_rows: int | None = None, balanced: bool = False,
                  in_process_rows: int = 0) -> Any:
    """Starts an EpochPlanner actor (no CPU of its own: the Ray Data tasks it runs take theirs).
    If its node is lost, Ray restarts it elsewhere and retries the calls; it rebuilds any epoch
    in the same order, and the trainers, restarted by Ray Train, ask for their splits again
    (naming their round's data rounds, which a restarted planner has not been told)."""
    remote_cls = ray.remote(num_cpus=0, max_concurrency=8, max_restarts=-1,
                            max_task_retries=-1)(EpochPlanner)
    return remote_cls.remote(store_root, rounds, weights, seed, world_size, pairs, run_rows,
                             balanced, in_process_rows)


def split_step_batches(split: ray.data.Dataset, micro_batch: int, grad_accum: int,
                       skip_steps: int, collate: TrajectoryCollate,
                       prefetch_batches: int = 4) -> Iterator[list[dict[str, torch.Tensor]]]:
    """This rank's micro-batches grouped per global step, after skipping `skip_steps` steps.
    Each micro-batch carries `positions`: row indices within this rank's split."""
    group: list[dict[str, torch.Tensor]] = []
    batches = split.iter_torch_batches(batch_size=micro_batch, collate_fn=collate,
                                       drop_last=True, prefetch_batches=prefetch_batches,
                                       device="cpu")
    for k, batch in enumerate(batches):
        if k // grad_accum < skip_steps:
            continue
        batch["positions"] = torch.arange(k * micro_batch, (k + 1) * micro_batch)
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []


# ------------------------------------------------------------------------------------------
# Reference stage
# ------------------------------------------------------------------------------------------

class ReferenceScorer:
    """Actor-pool map_batches class: log pi_ref of each response token, once per trajectory."""

    def __init__(self, model_path: str, pad_id: int, use_gpu: bool = False,
                 batch_size: int = 16) -> None:
        from dqo_ray.models.reference import ReferenceModel

        torch.set_num_threads(1)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.reference = ReferenceModel(model_path, pad_id, device, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = np.empty(len(batch["traj_id"]), dtype=object)
        out[:] = self.reference.logprobs(batch["prompt_ids"], batch["response_ids"])
        return {"path": batch["path"], "traj_id": batch["traj_id"], "ref_logprobs": out}


def score_reference(store: TrajectoryStore, model_path: str, pad_id: int,
                    rounds: Sequence[int] | None = None, actors: int = 1,
                    batch_size: int = 16, use_gpu: bool = False) -> int:
    """Fills ref_logprobs (and unknown behaviour_logprobs := ref, i.e. data assumed sampled
    from pi_ref) for every shard lacking them; persists per shard. Returns rows scored."""
    pending = [s for s in store.shards(rounds) if not s.has_ref_logprobs]
    if not pending:
        log.info("reference stage: every shard already has ref_logprobs")
        return 0
    store.check(pending)  # a damaged file is named here, not deep inside a Ray Data read
    by_path = dict(zip(store.paths(pending), pending, strict=True))
    total = sum(s.num_rows for s in pending)
    log.info("reference stage: %d rows in %d shards, %d actor(s)", total, len(pending), actors)
    _deterministic_context()
    ds = ray.data.read_parquet(list(by_path), filesystem=store.filesystem,
                               columns=["traj_id", "prompt_ids", "response_ids"],
                               include_paths=True, partitioning=None)
    scored = ds.map_batches(ReferenceScorer, fn_constructor_kwargs={
        "model_path": model_path, "pad_id": pad_id, "use_gpu": use_gpu,
        "batch_size": batch_size},
        batch_size=batch_size, concurrency=actors, num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1, batch_format="numpy")
    partial: dict[str, dict[str, np.ndarray]] = {p: {} for p in by_path}
    done, start = 0, time.perf_counter()
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        for path, traj_id, logprobs in zip(batch["path"], batch["traj_id"],
                                           batch["ref_logprobs"], strict=True):
            partial[_normalise(path, by_path)][traj_id] = logprobs
        done += len(batch["traj_id"])
        for path in [p for p, got in partial.items() if len(got) == by_path[p].num_rows]:
            _persist(store, by_path[path], partial.pop(path))
        rate = done / max(time.perf_counter() - start, 1e-9)
        log.info("reference stage: %d/%d rows (%.0f rows/s, ETA %.0fs)", done, total, rate,
                 (total - done) / max(rate, 1e-9))
    if partial:
        raise RuntimeError(f"reference stage: shards {sorted(partial)} were not fully scored")
    return done


def _normalise(path: str, known: Mapping[str, ShardInfo]) -> str:
    if path in known:
        return path
    for candidate in known:  # include_paths may drop or add a scheme / leading slash
        if candidate.endswith(path.lstrip("/")) or path.endswith(candidate.lstrip("/")):
            return candidate
    raise KeyError(f"reference stage: unexpected path {path!r}")


def _persist(store: TrajectoryStore, shard: ShardInfo, scores: dict[str, np.ndarray]) -> None:
    table = store.read_table([shard])
    traj_ids = table.column("traj_id").to_pylist()
    ref = pa.array([scores[t].tolist() for t in traj_ids], type=pa.list_(pa.float32()))
    behaviour = table.column("behaviour_logprobs").to_pylist()
    behaviour = pa.array([b if b is not None else r for b, r in zip(behaviour, ref.to_pylist(),
                                                                    strict=True)],
                         type=pa.list_(pa.float32()))
    table = table.set_column(table.schema.get_field_index("ref_logprobs"), "ref_logprobs", ref)
    table = table.set_column(table.schema.get_field_index("behaviour_logprobs"),
                             "behaviour_logprobs", behaviour)
    store.replace_shard(shard, table)
