"""Preference pairs for DPO (dqo_ray/data/pairs.py) and the config rule that keeps them whole."""

from __future__ import annotations

import random
from collections import Counter

import pyarrow as pa
import pytest

from dqo_ray.config import ConfigError, load_config
from dqo_ray.data.order import hash63, order_keys
from dqo_ray.data.pairs import preference_pairs

SEED, EPOCH = 3, 0


def rows_table(spec: list[tuple[str, bool]], seed: int = SEED, epoch: int = EPOCH,
               traj_ids: list[str] | None = None) -> pa.Table:
    """One row per (prompt_id, correct); traj_id t<i> unless given; order_key as MixAndKey
    computes it (copy 0); `payload` = i, a column pairing must carry along."""
    traj_ids = traj_ids or [f"t{i}" for i in range(len(spec))]
    copies = Counter()
    copy_no = []
    for t in traj_ids:
        copy_no.append(copies[t])
        copies[t] += 1
    return pa.table({"traj_id": traj_ids,
                     "prompt_id": [p for p, _ in spec],
                     "correct": [c for _, c in spec],
                     "payload": list(range(len(spec))),
                     "order_key": pa.array(order_keys(traj_ids, copy_no, seed, epoch),
                                           type=pa.int64())})


def epoch_order(table: pa.Table) -> list[dict]:
    """The rows as the pipeline orders them: a stable sort by (order_key, pair_pos)."""
    rows = table.to_pylist()
    return sorted(rows, key=lambda r: (r["order_key"], r["pair_pos"]))


def matching(rows: list[dict]) -> set[tuple[str, str]]:
    return {(c["traj_id"], r["traj_id"]) for c, r in zip(rows[0::2], rows[1::2], strict=True)}


MIXED = ([("a", True)] * 3 + [("a", False)] * 2  # 2 pairs
         + [("b", True)] * 2  # only correct: no pair
         + [("c", False)] * 3  # only incorrect: no pair
         + [("d", False)] * 4 + [("d", True)]  # 1 pair
         + [("e", True), ("e", False)])  # 1 pair


def test_sorted_rows_are_chosen_then_rejected_of_one_prompt():
    spec = MIXED[:]
    random.Random(0).shuffle(spec)
    rows = epoch_order(preference_pairs(rows_table(spec), SEED, EPOCH))
    assert len(rows) == 2 * 4
    assert [r["pair_pos"] for r in rows] == [0, 1] * 4
    for chosen, rejected in zip(rows[0::2], rows[1::2], strict=True):
        assert chosen["prompt_id"] == rejected["prompt_id"]
        assert chosen["correct"] is True and rejected["correct"] is False
        assert chosen["order_key"] == rejected["order_key"]  # the pair's one sort key
    pair_keys = [r["order_key"] for r in rows[0::2]]
    assert pair_keys == sorted(set(pair_keys))  # distinct keys: pairs never interleave
    # the pair key is the chosen row's own order key; other columns come along unchanged
    by_traj = {r["traj_id"]: r for r in rows_table(spec).to_pylist()}
    for chosen, rejected in zip(rows[0::2], rows[1::2], strict=True):
        assert chosen["order_key"] == by_traj[chosen["traj_id"]]["order_key"]
        assert rejected["payload"] == by_traj[rejected["traj_id"]]["payload"]


def test_pair_count_is_min_of_correct_and_incorrect_per_prompt():
    gen = random.Random(1)
    spec = [(f"p{gen.randrange(12)}", gen.random() < 0.3) for _ in range(200)]
    out = preference_pairs(rows_table(spec), SEED, EPOCH)
    per_prompt = {p: Counter(c for q, c in spec if q == p) for p, _ in spec}
    expected = {p: min(n[True], n[False]) for p, n in per_prompt.items()}
    assert out.num_rows == 2 * sum(expected.values()) > 0
    got = Counter(out.column("prompt_id").to_pylist()[0::2])
    assert got == {p: n for p, n in expected.items() if n}  # prompts without a pair: absent
    assert len(set(out.column("traj_id").to_pylist())) == out.num_rows  # no row used twice


def test_prompts_with_one_side_only_give_nothing():
    spec = [("b", True)] * 3 + [("c", False)] * 2
    out = preference_pairs(rows_table(spec), SEED, EPOCH)
    assert out.num_rows == 0
    assert out.column_names == ["traj_id", "prompt_id", "correct", "payload", "order_key",
                                "pair_pos"]
    assert out.schema.field("pair_pos").type == pa.int8()


def test_rows_are_ranked_by_the_pair_hash_not_by_order():
    spec = [("a", True)] * 3 + [("a", False)] * 2
    table = rows_table(spec)
    rank = sorted(range(5), key=lambda i: hash63("pair", SEED, EPOCH, f"t{i}"))
    chosen = [f"t{i}" for i in rank if i < 3][:2]
    rejected = [f"t{i}" for i in rank if i >= 3]
    expected = set(zip(chosen, rejected, strict=True))
    assert matching(epoch_order(preference_pairs(table, SEED, EPOCH))) == expected
    # the same rows under other order keys (another seed's order) pair the same way
    other = table.set_column(4, "order_key", rows_table(spec, seed=99).column("order_key"))
    assert matching(epoch_order(preference_pairs(other, SEED, EPOCH))) == expected


def test_deterministic_and_independent_of_input_order():
    table = rows_table(MIXED)
    first = preference_pairs(table, SEED, EPOCH)
    assert preference_pairs(table, SEED, EPOCH).equals(first)
    permuted = table.take(pa.array(random.Random(2).sample(range(len(MIXED)), len(MIXED))))
    assert epoch_order(preference_pairs(permuted, SEED, EPOCH)) == epoch_order(first)


def test_other_epochs_pair_other_rows():
    spec = [("a", True)] * 3 + [("a", False)] * 3
    matchings = []
    for epoch in range(8):
        rows = epoch_order(preference_pairs(rows_table(spec, epoch=epoch), SEED, epoch))
        matchings.append(frozenset(matching(rows)))
        assert len(matchings[-1]) == 3
    assert len(set(matchings)) > 1
    # an unbalanced prompt leaves out different rows from epoch to epoch
    spec = [("a", True)] * 4 + [("a", False)]
    used = {tuple(preference_pairs(rows_table(spec, epoch=e), SEED, e)
                  .column("traj_id").to_pylist()) for e in range(8)}
    assert len(used) > 1
    # ...and another seed, same epoch, too
    seeds = {tuple(preference_pairs(rows_table(spec, seed=s), s, EPOCH)
                   .column("traj_id").to_pylist()) for s in range(8)}
    assert len(seeds) > 1


def test_copies_of_a_row_pair_like_other_rows():
    # a round of weight 2: every row twice, the copies with their own order keys
    spec = [("a", True), ("a", False), ("a", True), ("a", False)]
    table = rows_table(spec, traj_ids=["c", "r", "c", "r"])
    rows = epoch_order(preference_pairs(table, SEED, EPOCH))
    assert [(r["traj_id"], r["pair_pos"]) for r in rows] == [("c", 0), ("r", 1)] * 2
    assert rows[0]["order_key"] != rows[2]["order_key"]  # two pairs, two places in the epoch


@pytest.mark.parametrize("drop", ["prompt_id", "correct"])
def test_missing_columns_are_named(drop):
    table = rows_table(MIXED).drop_columns([drop])
    with pytest.raises(ValueError, match=rf"preference_pairs: missing column\(s\) {drop};"):
        preference_pairs(table, SEED, EPOCH)


def test_dpo_needs_an_even_micro_batch():
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_size: 7 must be even for "
                                          r"algo.name 'dpo'"):
        load_config(None, ["algo.name=dpo", "trainer.micro_batch_size=7"])
    assert load_config(None, ["algo.name=dpo", "trainer.micro_batch_size=8"]).algo.name == "dpo"
    assert load_config(None, ["trainer.micro_batch_size=7"]).trainer.micro_batch_size == 7
