"""GeneratorPool on the shared local Ray cluster with real engines and the tiny model."""

import collections
import itertools

import pytest
import ray
import torch
from conftest import TINY_WORDS

from actors.generator import GeneratorPool, traj_id_for
from dqo_ray.config import load_config
from dqo_ray.data.store import TrajectoryStore
from dqo_ray.models import load_policy, load_tokenizer, save_tiny_checkpoint
from dqo_ray.models.weight_broadcast import WeightSender
from dqo_ray.models.weights import export_tensors
from dqo_ray.tasks import grade
from dqo_ray.tasks.items import PromptItem

pytestmark = pytest.mark.ray


def items_for(checkpoint, count):
    tok = load_tokenizer(checkpoint)
    out = []
    for i in range(count):
        text = tok.apply_chat_template([{"role": "user", "content": f"Tom has {i} apples"}],
                                       add_generation_prompt=True, tokenize=False)
        out.append(PromptItem(f"toy/{i}", "toy", "gsm8k", text,
                              tok(text, add_special_tokens=False)["input_ids"], str(i % 10)))
    return out


def pool_config(tmp_path, **generation):
    settings = dict(engine="vllm", num_engines=2, samples_per_prompt=2, temperature=1.0,
                    max_new_tokens=12, chunk_prompts=4, cpus_per_engine=1.0, kv_cache_gb=0.25)
    settings.update(generation)
    return load_config(None, [f"data.store={tmp_path / 'store'}"] +
                       [f"generation.{k}={v}" for k, v in settings.items()])


def test_killed_actor_loses_no_prompt_and_writes_no_duplicate(tmp_path, tiny_checkpoint,
                                                               ray_address):
    cfg = pool_config(tmp_path, chunks_in_flight=2)
    store = TrajectoryStore(str(tmp_path / "store"))
    items = items_for(tiny_checkpoint, 24)
    pool = GeneratorPool(cfg, str(tiny_checkpoint))
    killed = []

    def kill_second_engine(chunks_done, pool):
        if chunks_done == 1:
            killed.append(pool.actors[1])
            ray.kill(pool.actors[1], no_restart=True)  # its in-flight chunk dies with it

    summary = pool.generate(items, round=3, policy_version=7, store=store,
                            on_chunk=kill_second_engine)
    # two chunks in flight per engine (generation.chunks_in_flight): both of the killed
    # engine's fail, and it is replaced once
    assert killed and summary.replaced_actors == 1
    assert 0 < summary.sampling_share <= 1
    rows = store.read_table().to_pylist()
    ids = [r["traj_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 48 == summary.samples
    per_prompt = collections.Counter(r["prompt_id"] for r in rows)
    assert per_prompt == {i.prompt_id: 2 for i in items}
    assert set(ids) == {traj_id_for(3, i.prompt_id, j) for i in items for j in range(2)}
    for row in rows:
        assert row["round"] == 3 and row["policy_version"] == 7
        assert len(row["behaviour_logprobs"]) == len(row["response_ids"])
        assert all(lp <= 1e-4 for lp in row["behaviour_logprobs"])
        gold = next(i.gold for i in items if i.prompt_id == row["prompt_id"])
        assert row["correct"] == grade("gsm8k", row["response"], gold)
        assert row["reward"] == (1.0 if row["correct"] else 0.0)
    assert summary.accuracy == pytest.approx(sum(r["correct"] for r in rows) / 48)

    again = pool.generate(items, round=3, policy_version=7, store=store)  # resume: nothing new
    assert (again.prompts, again.skipped_prompts, again.samples) == (0, 24, 0)
    assert store.num_rows() == 48
    pool.shutdown()


@torch.no_grad()
def hf_greedy(checkpoint, prompt_ids, max_new):
    model = load_policy(checkpoint).eval()
    tok = load_tokenizer(checkpoint)
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def perturbed_copy(checkpoint, folder, seed=1, std=0.5):
    """Same architecture and tokenizer, clearly different weights. (Two random inits are not
    enough: with tied embeddings a random tiny Llama's greedy choice is its last input token.)"""
    model = load_policy(checkpoint)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(folder)
    load_tokenizer(checkpoint).save_pretrained(folder)
    return folder


def greedy_rows(pool, items, tmp_path, name):
    store = TrajectoryStore(str(tmp_path / name))
    summary = pool.generate(items, round=0, policy_version=1, store=store)
    return {r["prompt_id"]: r["response_ids"] for r in store.read_table().to_pylist()}, summary


def test_weight_refresh_by_broadcast_reaches_replaced_actors_and_falls_back_to_the_folder(
        tmp_path, tiny_checkpoint, ray_address):
    """generation.weight_transfer=broadcast on a CPU: the trainer's rank 0 (here this process)
    sends over gloo and both vLLM engine actors, one group, sample from the new weights; an
    engine that dies afterwards comes back with them (from the round's folder). A broadcast
    that cannot happen (its sender is gone) costs a short wait, then every engine loads the
    folder."""
    other = perturbed_copy(tiny_checkpoint, tmp_path / "other")
    cfg = pool_config(tmp_path, samples_per_prompt=1, temperature=0.0, max_new_tokens=8,
                      chunk_prompts=2)
    pool = GeneratorPool(cfg, str(tiny_checkpoint))
    items = items_for(tiny_checkpoint, 6)
    host = ray.util.get_node_ip_address()
    sender = WeightSender(export_tensors(load_policy(other).state_dict()), "gloo", host, 60)
    pool.load_weights(str(other), sender.offer)
    assert sender.sent.is_set() and sender.error is None
    sender.close()
    ray.kill(pool.actors[0], no_restart=True)  # the replacement must come up with `other`
    rows, summary = greedy_rows(pool, items, tmp_path, "a")
    assert summary.replaced_actors == 1
    changed = 0
    for item in items:
        response, new = rows[item.prompt_id], hf_greedy(other, item.prompt_ids, 8)
        assert response == new[:len(response)] and len(response) in (len(new), 8)
        changed += response != hf_greedy(tiny_checkpoint, item.prompt_ids, 8)[:len(response)]
    assert changed > 0  # the two models really differ on these prompts

    gone = WeightSender(export_tensors(load_policy(other).state_dict()), "gloo", host, 2)
    gone.close()  # its trainer restarted: nobody serves this offer
    pool.load_weights(str(tiny_checkpoint), gone.offer)
    rows, _ = greedy_rows(pool, items, tmp_path, "b")
    for item in items:
        old = hf_greedy(tiny_checkpoint, item.prompt_ids, 8)
        assert rows[item.prompt_id] == old[:len(rows[item.prompt_id])]
    pool.shutdown()


def test_process_rewards_are_shaped_step_values(tmp_path, ray_address):
    words = [*TINY_WORDS]
    checkpoint = save_tiny_checkpoint(tmp_path / "m", words, hidden_size=64, layers=2, heads=2,
                                      seed=2)
    cfg = pool_config(tmp_path, engine="hf", num_engines=1, samples_per_prompt=2,
                      max_new_tokens=16, process_reward_samples=2, process_reward_alpha=0.5)
    # newlines are frequent in random text of this vocabulary: make them the step delimiter ' '
    cfg.generation.step_delimiter = " "
    pool = GeneratorPool(cfg, str(checkpoint))
    store = TrajectoryStore(str(tmp_path / "store"))
    pool.generate(items_for(checkpoint, 4), round=0, policy_version=0, store=store)
    rows = store.read_table().to_pylist()
    assert len(rows) == 8
    multi_step = 0
    for row in rows:
        ends, rewards = row["step_ends"], row["step_rewards"]
        assert ends[-1] == len(row["response_ids"]) - 1 and ends == sorted(set(ends))
        assert len(rewards) == len(ends)
        # telescoping: sum = alpha * (outcome - p_0), p_0 a multiple of 1/m
        p0 = (1.0 if row["correct"] else 0.0) - sum(rewards) / 0.5
        assert min(abs(p0 - v) for v in (0.0, 0.5, 1.0)) < 1e-5, (p0, rewards)
        # step_values are the measured p where each step starts: p_0, then p_1 .. p_{K-1}
        values = [*row["step_values"], 1.0 if row["correct"] else 0.0]
        assert len(row["step_values"]) == len(ends) and values[0] == pytest.approx(p0)
        assert set(row["step_values"]) <= {0.0, 0.5, 1.0}
        assert rewards == pytest.approx([0.5 * (b - a) for a, b in itertools.pairwise(values)])
        multi_step += len(ends) > 1
    assert multi_step > 0
    pool.shutdown()
