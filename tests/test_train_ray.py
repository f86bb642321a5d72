"""Ray Data + Ray Train + DeepSpeed on the shared local Ray cluster, with the tiny model.

Covers: the reference stage equals a direct forward pass; DQO learns on a fixed store;
ZeRO stages 1-3 agree step by step; a killed worker and a killed driver both resume from the
last checkpoint with exact epoch accounting (no position skipped or trained twice).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import ray
import torch
import yaml
from conftest import REPO, write_toy_store

from dqo_ray.data.store import TrajectoryStore
from dqo_ray.data.streams import EpochPlanner, planner_actor, score_reference
from dqo_ray.models import ValueModel, load_policy, load_tokenizer
from dqo_ray.models.weight_broadcast import receive_weights
from jobs import train as train_job

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny_checkpoint, ray_address):
    """A toy store whose reference stage has run (4 shards x 96 rows)."""
    root = tmp_path_factory.mktemp("store") / "store"
    store = write_toy_store(root, tiny_checkpoint, shards=4, rows_per_shard=96)
    pad = load_tokenizer(tiny_checkpoint).pad_token_id
    assert score_reference(store, str(tiny_checkpoint), pad, actors=2, batch_size=16) == 384
    return root


def job_config(tmp_path: Path, store_root: Path, checkpoint: Path, **trainer) -> Path:
    store = tmp_path / "store"
    shutil.copytree(store_root, store)
    settings = dict(num_workers=2, micro_batch_size=8, grad_accum_steps=2, max_steps=8,
                    log_every=1, checkpoint_every=4, policy_lr=1.0e-3, value_lr=1.0e-3,
                    num_to_keep=2, ledger=True)
    settings.update(trainer)
    cfg = {"run": {"name": "t", "output_dir": str(tmp_path / "runs")},
           "model": {"policy": str(checkpoint)}, "data": {"store": str(store)},
           "algo": {"beta": 0.1}, "trainer": settings}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its snapshot under run_dir/train)."""
    snapshot = run_dir / "train" / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except json.JSONDecodeError:  # caught mid-write
        return []
    return [int(r["checkpoint_dir_name"].split("-")[1]) for r in results]


def final_history(ledger: Path) -> dict[int, dict[int, dict]]:
    """rank -> step -> the last record written for that step (a resumed run overwrites)."""
    out: dict[int, dict[int, dict]] = defaultdict(dict)
    for file in sorted(ledger.glob("rank*.jsonl")):
        rank = int(file.stem[4:])
        for record in read_jsonl(file):
            out[rank][record["step"]] = record
    return out


def assert_exact_epoch_accounting(ledger: Path, steps: int, world: int = 2) -> None:
    """Every rank trained steps 1..steps; within an epoch each rank's split positions form
    [0, n) with no repeat, and no row (order key) was trained twice across ranks."""
    history = final_history(ledger)
    assert sorted(history) == list(range(world))
    keys_by_epoch: dict[int, list[int]] = defaultdict(list)
    for rank, rank_steps in history.items():
        assert sorted(rank_steps) == list(range(1, steps + 1)), rank
        positions: dict[int, list[int]] = defaultdict(list)
        for record in rank_steps.values():
            positions[record["epoch"]].extend(record["positions"])
            keys_by_epoch[record["epoch"]].extend(record["order_key"])
        for epoch, pos in positions.items():
            assert sorted(pos) == list(range(len(pos))), f"rank {rank} epoch {epoch}"
    for epoch, keys in keys_by_epoch.items():
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a row trained twice"


def test_reference_stage_equals_direct_forward(scored_store, tiny_checkpoint):
    store = TrajectoryStore(str(scored_store))
    assert all(s.has_ref_logprobs for s in store.shards())
    model = load_policy(tiny_checkpoint).eval()
    table = store.read_table()
    rows = table.to_pylist()
    assert len(rows) == 384 and len({r["traj_id"] for r in rows}) == 384
    with torch.no_grad():
        for row in rows[::9]:
            ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            expected = logp.gather(-1, ids[0, 1:, None])[-len(row["response_ids"]):, 0]
            torch.testing.assert_close(torch.tensor(row["ref_logprobs"]), expected,
                                       rtol=0, atol=1e-5)
            # unknown behaviour policy -> treated as pi_ref (documented choice)
            assert row["behaviour_logprobs"] == row["ref_logprobs"]
    pad = load_tokenizer(tiny_checkpoint).pad_token_id
    assert score_reference(store, str(tiny_checkpoint), pad) == 0  # idempotent


def test_planner_prefetches_only_epochs_the_run_reaches(scored_store):
    # 384 rows an epoch; a run of 385 rows needs epoch 1 but not epoch 2.
    planner = EpochPlanner(str(scored_store), None, {}, seed=0, world_size=2, run_rows=385)
    assert planner.split(0, 0).count() == 192
    assert planner.planned_epochs() == [0, 1]  # epoch 1 built while epoch 0 trains
    assert planner.split(1, 1).count() == 192
    assert planner.planned_epochs() == [0, 1]  # no epoch 2: the run ends within epoch 1
    planner.close()


def test_planner_balanced_epoch_is_the_balanced_selection_in_epoch_order(
        tmp_path, tiny_checkpoint, ray_address):
    # Rows 2k, 2k+1 share a prompt across both shards (4 rows a prompt); one outcome for
    # prompts 0 and 1, 3 correct + 1 wrong for prompt 2, 2 + 2 for the rest.
    def correct(shard: int, i: int) -> bool:
        k = i // 2
        return k == 0 or (k == 2 and (shard, i % 2) != (1, 1)) or (k > 2 and i % 2 == 0)

    root = tmp_path / "store"
    write_toy_store(root, tiny_checkpoint, shards=2, rows_per_shard=16, paired=True,
                    correct=correct)
    table = TrajectoryStore(str(root)).read_table(columns=["traj_id", "prompt_id", "correct"])
    planner = EpochPlanner(str(root), None, {}, seed=0, world_size=2, balanced=True)
    for epoch in (0, 1):
        rows = [r for rank in (0, 1) for r in planner.split(epoch, rank).take_all()]
        keys = [r["order_key"] for r in rows]
        assert keys == sorted(keys)
        by_prompt = defaultdict(list)
        for r in rows:
            by_prompt[r["prompt_id"]].append(r["correct"])
        assert "p0" not in by_prompt and "p1" not in by_prompt  # one outcome: dropped
        assert sorted(by_prompt["p2"]) == [False, True]  # 3 + 1 -> 1 + 1
        assert all(sorted(v) == [False, False, True, True] for p, v in by_prompt.items()
                   if p not in ("p2",))
        assert len(rows) == 2 + 4 * 5 == sum(
            min(sum(c), len(c) - sum(c)) * 2 for c in _groups(table).values())
    planner.close()


@pytest.mark.parametrize("kind", ["all", "balanced", "pairs"])
def test_an_epoch_built_in_process_equals_the_ray_data_build(tmp_path, tiny_checkpoint,
                                                             ray_address, kind):
    root = tmp_path / "store"
    write_toy_store(root, tiny_checkpoint, shards=4, rows_per_shard=96, paired=True,
                    correct=lambda shard, i: (i // 2 + shard + i) % 3 == 0)
    options = {"balanced": kind == "balanced", "pairs": kind == "pairs"}
    weights = {0: 1.5}  # some rows twice: copies keep distinct order keys
    built = {}
    for where, rows in (("ray data", 0), ("in process", 10**6)):
        # As in a run: the planner is an actor, each trainer reads its split in batches.
        planner = planner_actor(str(root), None, weights, 3, 2, options["pairs"], None,
                                options["balanced"], rows)
        splits = [ray.get(planner.split.remote(1, rank)) for rank in (0, 1)]
        built[where] = ray.get([_read_like_a_trainer.remote(split) for split in splits])
        ray.kill(planner)
    assert built["in process"] == built["ray data"]
    assert sum(map(len, built["ray data"])) > 0


@ray.remote(num_cpus=0)
def _read_like_a_trainer(split) -> list[tuple]:
    rows = []
    for batch in split.iter_batches(batch_size=4, prefetch_batches=4):
        pair_pos = batch.get("pair_pos", [None] * len(batch["traj_id"]))
        rows += zip(batch["traj_id"], batch["order_key"], pair_pos, strict=True)
    return rows


def _groups(table) -> dict[str, list[bool]]:
    out = defaultdict(list)
    for row in table.to_pylist():
        out[row["prompt_id"]].append(row["correct"])
    return out


def sequence_logprob_gap(model, rows, tokens: slice = slice(None)) -> float:
    """mean log pi(y|x) of correct responses minus that of incorrect ones (over the response
    tokens in `tokens`)."""
    sums = {True: [], False: []}
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            n = len(row["response_ids"])
            token_lp = logp.gather(-1, ids[0, 1:, None])[-n:, 0]
            sums[row["correct"]].append(token_lp[tokens].sum().item())
    return sum(sums[True]) / len(sums[True]) - sum(sums[False]) / len(sums[False])


def test_dqo_learns_on_a_fixed_store(tmp_path, scored_store, tiny_checkpoint, ray_address,
                                     capsys):
    cfg = job_config(tmp_path, scored_store, tiny_checkpoint, max_steps=24, checkpoint_every=12)
    assert train_job.main(["--config", str(cfg), "--set", f"ray.address={ray_address}"]) == 0
    out = capsys.readouterr().out
    policy_dir = out.split("policy (HF format, loadable by vLLM): ")[1].split()[0]
    run_dir = tmp_path / "runs" / "t"
    metrics = read_jsonl(run_dir / "train_metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 25))
    first = sum(m["loss"] for m in metrics[:4]) / 4
    last = sum(m["loss"] for m in metrics[-4:]) / 4
    assert last < 0.7 * first, (first, last)

    rows = TrajectoryStore(str(tmp_path / "store")).read_table().to_pylist()
    before = sequence_logprob_gap(load_policy(tiny_checkpoint).eval(), rows)
    trained = load_policy(policy_dir).eval()
    after = sequence_logprob_gap(trained, rows)
    # rewarded responses gain log-probability relative to unrewarded ones (measured when
    # written: gap 0.01 -> 0.50 nats after 24 steps; initial gap is noise around 0)
    assert after > before + 0.2, (before, after)

    ckpt = Path(policy_dir).parent
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 24
    assert (ckpt / "policy" / "model.safetensors").exists()
    assert isinstance(ValueModel.from_pretrained(ckpt / "value"), ValueModel)
    assert len([p for p in (run_dir / "train").glob("checkpoint-*") if p.is_dir()]) == 2
    assert (run_dir / "config.resolved.yaml").exists()
    assert_exact_epoch_accounting(run_dir / "ledger", 24)


def test_dpo_trains_on_whole_pairs(tmp_path, tiny_checkpoint, ray_address):
    """algo.name=dpo: every micro-batch is (chosen, rejected) pairs of one prompt, pairs are
    never cut between ranks, and the chosen responses gain log-probability on the rejected."""
    store = write_toy_store(tmp_path / "paired", tiny_checkpoint, shards=2, rows_per_shard=64,
                            paired=True)
    pad = load_tokenizer(tiny_checkpoint).pad_token_id
    assert score_reference(store, str(tiny_checkpoint), pad) == 128
    cfg = job_config(tmp_path, tmp_path / "paired", tiny_checkpoint, max_steps=12,
                     checkpoint_every=12)
    assert train_job.main(["--config", str(cfg), "--set", f"ray.address={ray_address}",
                           "--set", "algo.name=dpo", "--set", "algo.dpo_beta=0.5",
                           # a pipeline's later round names the last round's value folder,
                           # which an algorithm without a value model never wrote
                           "--set", f"model.value={tmp_path}/no-such-value"]) == 0
    run_dir = tmp_path / "runs" / "t"
    metrics = read_jsonl(run_dir / "train_metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = pi_ref
    assert metrics[-1]["dpo_margin"] > 0.5, metrics[-1]

    # 64 pairs per epoch, 32 per rank, 2 pairs x 2 micro-batches per step: 4 steps an epoch
    pair_keys: dict[int, list[int]] = defaultdict(list)
    for rank_steps in final_history(run_dir / "ledger").values():
        for record in rank_steps.values():
            keys = record["order_key"]
            assert len(keys) == 2 * 8
            assert keys[0::2] == keys[1::2], keys  # both rows of a pair share its key
            pair_keys[record["epoch"]] += keys[0::2]
    assert sorted(pair_keys) == [0, 1, 2]
    for keys in pair_keys.values():
        assert len(keys) == len(set(keys)) == 64  # every pair once per epoch, none cut

    ckpt = run_dir / "train" / "checkpoint-0000012"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 12
    rows = TrajectoryStore(str(tmp_path / "store")).read_table().to_pylist()
    before = sequence_logprob_gap(load_policy(tiny_checkpoint).eval(), rows)
    after = sequence_logprob_gap(load_policy(ckpt / "policy").eval(), rows)
    assert after > before + 0.5, (before, after)


def test_dqo_with_mc_step_values_credits_the_step_that_decided(tmp_path, tiny_checkpoint,
                                                             ray_address):
    """algo.step_values=mc through Ray Train: no value model, and the step whose start-to-end
    success rate moved (the first: 0.5 -> 1 when correct, 0.5 -> 0 when not) is what moves;
    the second step (no change of value) stays level."""
    store = write_toy_store(tmp_path / "steps", tiny_checkpoint, shards=2, rows_per_shard=64,
                            step_values=lambda ok: [0.5, 1.0 if ok else 0.0])
    pad = load_tokenizer(tiny_checkpoint).pad_token_id
    assert score_reference(store, str(tiny_checkpoint), pad) == 128
    cfg = job_config(tmp_path, tmp_path / "steps", tiny_checkpoint, max_steps=12,
                     checkpoint_every=12)
    assert train_job.main(["--config", str(cfg), "--set", f"ray.address={ray_address}",
                           "--set", "algo.step_values=mc", "--set", "algo.beta=0.5",
                           "--set", "generation.process_reward_samples=4",
                           "--set", "generation.process_reward_alpha=0"]) == 0
    run_dir = tmp_path / "runs" / "t"
    metrics = read_jsonl(run_dir / "train_metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all(m["steps_per_row"] == 2 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    ckpt = run_dir / "train" / "checkpoint-0000012"
    assert (ckpt / "policy").is_dir() and not (ckpt / "value").exists()
    rows = TrajectoryStore(str(tmp_path / "store")).read_table().to_pylist()
    start, trained = load_policy(tiny_checkpoint).eval(), load_policy(ckpt / "policy").eval()
    first = [sequence_logprob_gap(m, rows, tokens=slice(0, 3)) for m in (start, trained)]
    second = [sequence_logprob_gap(m, rows, tokens=slice(3, None)) for m in (start, trained)]
    assert first[1] > first[0] + 1.0, first
    assert abs(second[1] - second[0]) < (first[1] - first[0]) / 3, (first, second)


def test_damaged_shard_stops_training_by_name_before_it_starts(
        tmp_path, scored_store, tiny_checkpoint, ray_address, capsys):
    cfg = job_config(tmp_path, scored_store, tiny_checkpoint, max_steps=2, checkpoint_every=2)
    store = TrajectoryStore(str(tmp_path / "store"))
    victim = store.shards()[1]
    path = Path(store.paths([victim])[0])
    path.write_bytes(path.read_bytes()[:1000])  # a bad copy: truncated
    args = ["--config", str(cfg), "--set", f"ray.address={ray_address}"]
    assert train_job.main(args) == 2
    err = capsys.readouterr().err
    assert f"shard {victim.name!r} (round 0, {path}): its file has 1000 bytes" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "t" / "train").exists()
    store.quarantine(victim)  # the rest passes the same check training runs first
    store.check()
    assert store.num_rows() == 3 * 96


def train_and_receive_the_broadcast(cfg_path: Path, address: str):
    """One round with generation.weight_transfer=broadcast: rank 0 offers the round's weights
    (gloo here, NCCL on GPUs) and this process receives them as an engine would, while the
    trainer is still up. Returns them and the round's saved policy."""
    from safetensors.torch import load_file

    from dqo_ray.config import load_config
    from dqo_ray.runtime import init_ray
    from dqo_ray.train.ray_trainer import RoundTrainer

    cfg = load_config(str(cfg_path), [f"ray.address={address}",
                                      "generation.weight_transfer=broadcast"])
    init_ray(cfg.ray)
    trainer = RoundTrainer(cfg, str(cfg.model.policy), cfg.run.run_dir)
    try:
        result = trainer.train_round(0, None)
        assert result.weights.backend == "gloo"
        received = dict(receive_weights(result.weights, 1, 2, "cpu"))
    finally:
        trainer.close()
    return received, load_file(Path(result.policy) / "model.safetensors")


def test_zero_stages_agree(tmp_path, scored_store, tiny_checkpoint, ray_address):
    """... and ZeRO-3's gathered weights reach the engines by broadcast exactly as saved."""
    losses = {}
    for stage in (1, 2, 3):
        cfg = job_config(tmp_path / f"z{stage}", scored_store, tiny_checkpoint, max_steps=3,
                         checkpoint_every=3, zero_stage=stage)
        if stage < 3:
            assert train_job.main(["--config", str(cfg),
                                   "--set", f"ray.address={ray_address}"]) == 0
        else:
            received, saved = train_and_receive_the_broadcast(cfg, ray_address)
            assert set(saved) <= set(received) <= set(saved) | {"lm_head.weight"}
            for name, tensor in saved.items():
                assert torch.equal(received[name], tensor), name
        metrics = read_jsonl(tmp_path / f"z{stage}" / "runs" / "t" / "train_metrics.jsonl")
        losses[stage] = [m["loss"] for m in metrics]
    assert len(losses[1]) == 3
    for stage in (2, 3):
        assert losses[stage] == pytest.approx(losses[1], rel=1e-4, abs=1e-6), losses


def run_job(cfg: Path, address: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(cfg),
                             "--set", f"ray.address={address}", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{proc.stdout.read()}")
        time.sleep(0.2)


def test_killed_worker_resumes_from_last_checkpoint(tmp_path, scored_store, tiny_checkpoint,
                                                    ray_address):
    cfg = job_config(tmp_path, scored_store, tiny_checkpoint, max_steps=16, checkpoint_every=2)
    run_dir, pid_file = tmp_path / "runs" / "t", tmp_path / "rank1.pid"
    proc = run_job(cfg, ray_address, "--kill-rank1-pid-file", str(pid_file))
    metrics = run_dir / "train_metrics.jsonl"
    # Kill once Ray has committed a checkpoint: a reported one is registered by the
    # controller's next poll, and a worker dying before that poll loses it.
    wait_for(lambda: pid_file.exists() and committed_steps(run_dir)
             and any(m["step"] >= 3 for m in read_jsonl(metrics)), proc)
    committed_at_kill = max(committed_steps(run_dir))
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # a real worker process dies
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    history = read_jsonl(metrics)
    steps = [m["step"] for m in history]
    assert steps[-1] == 16 and steps.count(1) == 1, steps
    # after the kill the group restarted from the newest committed checkpoint, not step 0
    # (the first line after the restart names the step it resumed from; its step number
    # need not go back: a kill right after a checkpoint resumes exactly where it stopped)
    restart = next(i for i, m in enumerate(history) if m["resumed_from"] > 0)
    resumed = history[restart]["resumed_from"]
    assert resumed in {m["step"] for m in history[:restart] if m["checkpoint"]}, steps
    assert resumed >= committed_at_kill >= 2 and steps[restart] == resumed + 1, steps
    assert_exact_epoch_accounting(run_dir / "ledger", 16)


def test_restarted_job_continues_from_last_checkpoint(tmp_path, scored_store, tiny_checkpoint,
                                                      ray_address):
    cfg = job_config(tmp_path, scored_store, tiny_checkpoint, max_steps=8, checkpoint_every=2)
    run_dir = tmp_path / "runs" / "t"
    metrics = run_dir / "train_metrics.jsonl"
    proc = run_job(cfg, ray_address)
    wait_for(lambda: any(m["step"] >= 4 and m["checkpoint"] for m in read_jsonl(metrics)),
             proc)
    proc.send_signal(signal.SIGKILL)  # the whole job dies mid-way
    proc.wait()
    reported = {m["step"] for m in read_jsonl(metrics) if m["checkpoint"]}
    time.sleep(3)  # let Ray reap the dead job's workers
    second = run_job(cfg, ray_address)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    history = read_jsonl(metrics)
    restart = next(i for i, m in enumerate(history) if m["resumed_from"] > 0)
    # The second job resumed from a checkpoint the first one reported (the newest that Ray
    # had committed when the driver died), never from step 0, and went on from the next step.
    resumed = history[restart]["resumed_from"]
    assert resumed in reported and resumed >= 2, (resumed, reported)
    assert history[restart]["step"] == resumed + 1
    assert all(m["resumed_from"] == 0 for m in history[:restart])
    assert history[-1]["step"] == 8
    assert_exact_epoch_accounting(run_dir / "ledger", 8)


def test_planner_builds_again_an_epoch_whose_build_lost_its_node():
    """A build whose Ray Data actor died with its node is built again, not handed to every
    restarted trainer as the same error (no Ray needed: _build is replaced)."""
    import concurrent.futures
    import threading

    import ray.exceptions

    from dqo_ray.data.streams import EpochPlanner

    class Built:
        def count(self) -> int:
            return 5

    calls: list[int] = []

    class Planner(EpochPlanner):
        def __init__(self) -> None:  # the parts split() uses, without a store
            self._pool = concurrent.futures.ThreadPoolExecutor(1)
            self._builds, self._lock, self.run_rows = {}, threading.Lock(), 5
            self._shards, self._rounds = {0: []}, {0: None}

        def _build(self, round: int, epoch: int) -> list:
            calls.append(epoch)
            if len(calls) == 1:
                raise ray.exceptions.ActorDiedError()
            return [Built()]

    assert Planner().split(0, 0).count() == 5 and calls == [0, 0]
