"""Preference pairs for DPO (dqo_ray/data/pairs.py) and the config rule that keeps them whole."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dqo_ray.config import ConfigError, load_config
from dqo_ray.data.pairs import preference_pairs


def rows_table(spec: list[tuple[str, bool, int]]) -> pa.Table:
    """(prompt_id, correct, order_key) per row; traj_id = its index."""
    return pa.table({"traj_id": [f"t{i}" for i in range(len(spec))],
                     "prompt_id": [p for p, _, _ in spec],
                     "correct": [c for _, c, _ in spec],
                     "order_key": pa.array([k for _, _, k in spec], type=pa.int64())})


def sorted_pairs(table: pa.Table) -> list[dict]:
    rows = table.to_pylist()
    return sorted(rows, key=lambda r: (r["order_key"], r["pair_pos"]))


def test_pairs_are_interleaved_chosen_then_rejected_of_one_prompt():
    spec = [("a", True, 50), ("a", False, 10), ("a", False, 30), ("a", True, 20),
            ("b", True, 5), ("b", True, 6),  # only correct: no pair
            ("c", False, 7),  # only incorrect: no pair
            ("d", False, 40), ("d", True, 60), ("d", False, 1)]
    out = sorted_pairs(preference_pairs(rows_table(spec)))
    # a: correct sorted by key (20, 50), incorrect (10, 30) -> pairs (t3, t1), (t0, t2)
    # d: correct (60) and the incorrect with the smaller key (1) -> (t8, t9)
    assert [(r["traj_id"], r["pair_pos"]) for r in out] == [
        ("t3", 0), ("t1", 1), ("t0", 0), ("t2", 1), ("t8", 0), ("t9", 1)]
    # both rows of a pair carry the chosen row's key, so the sort keeps them adjacent
    assert [r["order_key"] for r in out] == [20, 20, 50, 50, 60, 60]
    for chosen, rejected in zip(out[0::2], out[1::2], strict=True):
        assert chosen["prompt_id"] == rejected["prompt_id"]
        assert chosen["correct"] and not rejected["correct"]


def test_pair_count_is_min_of_correct_and_incorrect_per_prompt():
    spec = [(f"p{i % 5}", (i * 7) % 3 == 0, i * 13 % 101) for i in range(60)]
    out = preference_pairs(rows_table(spec))
    expected = 0
    for prompt in {p for p, _, _ in spec}:
        ok = sum(c for p, c, _ in spec if p == prompt)
        bad = sum(not c for p, c, _ in spec if p == prompt)
        expected += min(ok, bad)
    assert out.num_rows == 2 * expected > 0
    assert len(set(out.column("traj_id").to_pylist())) == out.num_rows  # no row used twice


def matching(rows: list[dict]) -> set[tuple[str, str]]:
    return {(c["traj_id"], r["traj_id"]) for c, r in zip(rows[0::2], rows[1::2], strict=True)}


def test_other_order_keys_pair_other_rows():
    spec = [("a", True, 1), ("a", True, 2), ("a", False, 3), ("a", False, 4)]
    first = sorted_pairs(preference_pairs(rows_table(spec)))
    again = sorted_pairs(preference_pairs(rows_table(spec)))
    assert first == again
    # another epoch gives other order keys: the other matching of the same rows
    reshuffled = [("a", True, 2), ("a", True, 1), ("a", False, 3), ("a", False, 4)]
    second = sorted_pairs(preference_pairs(rows_table(reshuffled)))
    assert matching(first) == {("t0", "t2"), ("t1", "t3")}
    assert matching(second) == {("t1", "t2"), ("t0", "t3")}


def test_missing_columns_are_named():
    table = pa.table({"traj_id": ["t0"], "correct": [True]})
    with pytest.raises(ValueError, match=r"missing column\(s\) prompt_id, order_key"):
        preference_pairs(table)


def test_dpo_needs_an_even_micro_batch():
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_size: 7 must be even for "
                                          r"algo.name 'dpo'"):
        load_config(None, ["algo.name=dpo", "trainer.micro_batch_size=7"])
    assert load_config(None, ["algo.name=dpo", "trainer.micro_batch_size=8"]).algo.name == "dpo"
    assert load_config(None, ["trainer.micro_batch_size=7"]).trainer.micro_batch_size == 7
