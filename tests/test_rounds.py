"""One trainer for every round: the round coordinator, the policy's weights handed over in
memory, pi_ref in the engines, and the per-round cost breakdown (rounds trained in one
process: tests/test_loop.py)."""

import threading

import pytest
import torch

from dqo_ray.config import load_config
from dqo_ray.evaluation.round_costs import breakdown_markdown, round_breakdown
from dqo_ray.models import load_policy, load_tokenizer
from dqo_ray.models.weights import load_blob, weights_blob
from dqo_ray.train.rounds import RoundCoordinator, checkpoint_step

# -- the coordinator ---------------------------------------------------------------------------


def _spec(r: int) -> dict:
    return {"round": r, "data_rounds": list(range(r + 1)), "end_step": 10 * (r + 1)}


def test_coordinator_hands_rounds_in_order_and_stops():
    coord = RoundCoordinator()
    assert coord.next_round(-1, timeout_s=0.01) == "wait"  # nothing posted yet
    got = []
    worker = threading.Thread(target=lambda: got.append(coord.next_round(-1, timeout_s=5)))
    worker.start()
    coord.post(_spec(0))
    worker.join()
    assert got[0]["round"] == 0 and got[0]["data_rounds"] == [0]
    coord.post(_spec(1))
    assert coord.next_round(0, timeout_s=0.01)["round"] == 1
    assert coord.wait_done(1, timeout_s=0.01) is None
    coord.checkpointed("/r/train/checkpoint-0000020", rank=0, world=1)  # its report persisted
    coord.round_done(1, {"checkpoint": "/r/train/checkpoint-0000020", "weights": ["ref"]})
    assert coord.wait_done(1, timeout_s=0.01)["weights"] == ["ref"]
    assert coord.latest_checkpoint() == "/r/train/checkpoint-0000020"
    # A group restarted now asks from the start: round 0 is not reported done yet, so it is
    # handed out again (the restarted ranks, past its end, report it at once); then nothing.
    assert coord.next_round(-1, timeout_s=0.01)["round"] == 0
    coord.checkpointed("/r/train/checkpoint-0000010", rank=0, world=1)
    coord.round_done(0, {"checkpoint": "/r/train/checkpoint-0000010", "weights": ["old"]})
    assert coord.next_round(-1, timeout_s=0.01) == "wait"
    assert coord.latest_checkpoint() == "/r/train/checkpoint-0000020"
    coord.stop()
    assert coord.next_round(1, timeout_s=5) is None  # no round 2: the workers leave their loop


def test_a_resumed_driver_posts_its_first_unfinished_round_and_workers_take_it():
    coord = RoundCoordinator("/r/train/checkpoint-0000004")  # round 0 finished before
    coord.post(_spec(1))
    assert coord.next_round(-1, timeout_s=0.01)["round"] == 1  # not a wait for round 0


def test_coordinator_keeps_the_newest_checkpoint_and_counts_starts():
    coord = RoundCoordinator("/r/train/checkpoint-0000010")
    coord.checkpointed("/r/train/checkpoint-0000008")  # older: a late message
    assert coord.latest_checkpoint() == "/r/train/checkpoint-0000010"
    coord.checkpointed("s3://b/r/train/checkpoint-0000012")
    assert checkpoint_step(coord.latest_checkpoint()) == 12
    assert [coord.started(0), coord.started(1), coord.started(0), coord.started(-1)] == [1, 1,
                                                                                          2, 2]
    with pytest.raises(ValueError, match="not a checkpoint-<step> folder"):
        checkpoint_step("/r/train/policy")


# -- weights without disk ----------------------------------------------------------------------


def test_weights_blob_keeps_tied_weights_once_and_loads_into_an_engine(tiny_checkpoint,
                                                                      tmp_path):
    from actors.engines import SamplingSpec, make_engine

    model = load_policy(tiny_checkpoint)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # "trained": differs from the checkpoint
    tensors = load_blob(weights_blob(model.state_dict()))
    assert model.config.tie_word_embeddings and "lm_head.weight" not in tensors
    assert set(tensors) == set(model.state_dict()) - {"lm_head.weight"}
    half = load_blob(weights_blob(model.state_dict(), torch.bfloat16))
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "trained")
    load_tokenizer(tiny_checkpoint).save_pretrained(tmp_path / "trained")

    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    prompts = [[1, 5, 6], [1, 7]]
    from_disk = make_engine("hf", str(tmp_path / "trained"), seed=0)
    in_memory = make_engine("hf", str(tiny_checkpoint), seed=0)
    in_memory.load_weights(weights_blob(model.state_dict()))
    want, got = from_disk.generate(prompts, spec), in_memory.generate(prompts, spec)
    for a, b in zip(want, got, strict=True):
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        for x, y in zip(a, b, strict=True):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="weights do not fit this model"):
        in_memory.load_weights(weights_blob({"other.weight": torch.zeros(2)}))


# -- where the rounds' time went ----------------------------------------------------------------


def _stage(start: float, seconds: float, **result) -> dict:
    return {"finished_at": start + seconds, "seconds": seconds, "attempt": 0, "result": result}


def test_round_breakdown_from_the_records():
    stages = {"round0/data": _stage(0, 50), "round0/reference": _stage(50, 0),
              "round0/train": _stage(50, 40),
              "round1/data": _stage(55, 45, refresh_s=0.5),  # 35 s beside round 0's training
              "round1/reference": _stage(100, 0), "round1/train": _stage(100, 20),
              "round0/evaluate": _stage(120, 5), "round1/evaluate": _stage(120, 5)}
    # round 0: steps 10 s from t=60 (10 s to the first step), a 2 s checkpoint; round 1: 12 s
    # from t=104 (its window opened at 101, then 3 s waiting for data)
    metrics = [{"round": 0, "step": 5, "time": 65.0, "steps_per_s": 1.0, "step_s": 5.0},
               {"round": 0, "step": 10, "time": 72.0, "steps_per_s": 1.0, "step_s": 5.0,
                "checkpoint_s": 2.0},
               {"round": 1, "step": 25, "time": 116.0, "steps_per_s": 1.0, "step_s": 15.0,
                "data_wait_frac": 0.2}]  # 3 s of it waiting for the first batch
    costs = round_breakdown(stages, metrics)
    r0, r1 = costs["rounds"]
    assert (r0["start"], r0["steps"], r0["checkpoint"], r0["other"]) == (10, 10, 2, 18)
    assert (r1["sampling"], r1["exposed"], r1["refresh"]) == (45, 10, 0.5)
    assert (r1["start"], r1["steps"], r1["other"]) == pytest.approx((4, 12, 4))
    assert costs["wall"] == 75 and costs["steps"] == 22 and costs["eval_wait"] == 5
    assert costs["overhead"] == pytest.approx(53 / 75)
    assert costs["overhead_excl_sampling"] == pytest.approx(43 / 75)
    text = breakdown_markdown(costs)
    assert "| 1 | 45.0 | 10.0 | 0.0 | 4.0 | 12.0 | 0.0 | 4.0 | 0.5 |" in text
    assert "overhead 71% (57% leaving out 10 s of sampling" in text
    # an older run: steps counted from 1 in each round, no step_s; refreshes from its log
    old = [{"round": 1, "step": 10, "time": 110.0, "steps_per_s": 2.0},
           {"round": 1, "step": 20, "time": 116.0, "steps_per_s": 2.0}]
    row = round_breakdown(stages, old, {1: 0.25})["rounds"][1]
    assert (row["steps"], row["start"]) == (10, 5) and row["refresh"] == 0.5  # state wins


# -- the engines: pi_ref resident, weights from memory -------------------------------------------


@pytest.mark.ray
def test_engines_score_samples_with_pi_ref_and_refresh_from_memory(tmp_path, tiny_checkpoint,
                                                                   ray_address):
    import ray

    from actors.generator import GeneratorPool
    from dqo_ray.data.store import TrajectoryStore
    from dqo_ray.tasks.items import PromptItem

    tok = load_tokenizer(tiny_checkpoint)
    items = [PromptItem(f"p{i}", "toy", "gsm8k", text, tok(text)["input_ids"], "1")
             for i, text in enumerate(["Tom has 3 apples", "How many apples are left"])]
    cfg = load_config(None, ["generation.engine=vllm", "generation.num_engines=1",
                             "generation.samples_per_prompt=2", "generation.max_new_tokens=6",
                             "generation.kv_cache_gb=0.25", f"data.store={tmp_path / 'store'}"])
    store = TrajectoryStore(str(tmp_path / "store"))
    reference = load_policy(tiny_checkpoint).eval()
    trained = load_policy(tiny_checkpoint).eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))

    def logprobs(model, row) -> torch.Tensor:
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        return logp.gather(-1, ids[0, 1:, None])[-len(row["response_ids"]):, 0]

    pool = GeneratorPool(cfg, str(tiny_checkpoint), reference=str(tiny_checkpoint))
    try:
        pool.generate(items, round=0, policy_version=0, store=store)
        assert all(s.has_ref_logprobs for s in store.shards([0]))  # no reference stage needed
        seconds = pool.load_weights("round0-policy", ray.put(weights_blob(trained.state_dict())))
        assert seconds > 0 and pool.weights == "round0-policy"  # no such folder: memory only
        summary = pool.generate(items, round=1, policy_version=1, store=store)
        assert summary.samples == 4 and summary.ref_seconds > 0
    finally:
        pool.shutdown()
    for r, behaviour in ((0, reference), (1, trained)):
        for row in store.read_table(store.shards([r])).to_pylist():
            torch.testing.assert_close(torch.tensor(row["ref_logprobs"]),
                                       logprobs(reference, row), rtol=0, atol=1e-5)
            # sampled from the refreshed weights: its behaviour log-probs are the new model's
            torch.testing.assert_close(torch.tensor(row["behaviour_logprobs"]),
                                       logprobs(behaviour, row), rtol=0, atol=1e-4)


def test_the_coordinator_says_when_every_rank_has_started():
    coord = RoundCoordinator()
    assert coord.wait_started(2, 0.01) is False
    coord.started(1)
    assert coord.wait_started(2, 0.01) is False
    coord.started(0)
    assert coord.wait_started(2, 0.01) is True
    assert coord.started(-1) == 1  # a query (rank -1) counts no start


def test_a_checkpoint_is_a_resume_point_only_once_every_rank_has_persisted_its_part():
    """A rank killed while uploading its ZeRO shard leaves the checkpoint incomplete: the
    restarted group must resume from the one before (it failed on the missing shard)."""
    coord = RoundCoordinator("/r/train/checkpoint-0000004")
    coord.checkpointed("/r/train/checkpoint-0000008", rank=0, world=2)
    assert coord.latest_checkpoint() == "/r/train/checkpoint-0000004"  # rank 1's part missing
    coord.checkpointed("/r/train/checkpoint-0000008", rank=1, world=2)
    assert coord.latest_checkpoint() == "/r/train/checkpoint-0000008"
    coord.round_done(0, {"checkpoint": "/r/train/checkpoint-0000012", "weights": [None]})
    assert coord.latest_checkpoint() == "/r/train/checkpoint-0000008"  # its ranks say when
