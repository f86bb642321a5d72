"""Per-prompt outcome groups (dqo_ray/data/groups.py): the mixed-outcome share logged in
training, and the balanced selection behind data.prompt_groups."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
from test_pairs import rows_table

from dqo_ray.data.groups import balanced_groups, outcome_mix, require_mixed


def test_outcome_mix_counts_prompts_not_rows():
    mix = outcome_mix(["a", "a", "a", "b", "b", "c"], [True, False, False, False, False, True])
    assert mix == {"mixed_prompt_frac": 1 / 3, "all_correct_prompt_frac": 1 / 3,
                   "all_wrong_prompt_frac": 1 / 3, "prompts": 3}
    assert outcome_mix([], [])["prompts"] == 0


def test_balanced_training_without_a_mixed_prompt_is_refused_by_name():
    require_mixed(outcome_mix(["a", "a"], [True, False]), "data.prompt_groups=balanced", "s")
    one_sided = outcome_mix(["a", "a", "b"], [False, False, True])
    with pytest.raises(ValueError, match=r"store 's': none of its 2 prompts has both a correct "
                       r"and an incorrect sample, and data.prompt_groups=balanced trains only"):
        require_mixed(one_sided, "data.prompt_groups=balanced", "s")


def test_balanced_groups_keep_min_of_each_side_and_drop_one_sided_prompts():
    spec = ([("a", True)] * 3 + [("a", False)] * 5 + [("b", False)] * 4 + [("c", True)] * 2
            + [("d", True), ("d", False)])
    out = balanced_groups(rows_table(spec), seed=1, epoch=0).to_pylist()
    by_prompt = {}
    for row in out:
        by_prompt.setdefault(row["prompt_id"], []).append(row["correct"])
    assert {p: sorted(v) for p, v in by_prompt.items()} == {
        "a": [False] * 3 + [True] * 3, "d": [False, True]}
    assert all(set(row) == {"traj_id", "prompt_id", "correct", "payload", "order_key"}
               for row in out)  # other columns come along unchanged
    source = {r["traj_id"]: r for r in rows_table(spec).to_pylist()}
    assert all(source[r["traj_id"]] == r for r in out)


def test_balanced_choice_is_independent_of_input_order_and_rotates_with_the_epoch():
    spec = [("a", True)] * 2 + [("a", False)] * 8
    table = rows_table(spec)
    rows = table.to_pylist()
    random.Random(0).shuffle(rows)
    shuffled = pa.Table.from_pylist(rows, schema=table.schema)

    def kept(t, epoch):
        return sorted(r["traj_id"] for r in balanced_groups(t, seed=1, epoch=epoch).to_pylist())

    assert kept(table, 0) == kept(shuffled, 0)
    assert len(kept(table, 0)) == 4
    wrong_kept = {tuple(t for t in kept(table, e) if t not in ("t0", "t1")) for e in range(6)}
    assert len(wrong_kept) > 1  # other incorrect rows take their turn in other epochs


def test_balanced_groups_name_missing_columns():
    with pytest.raises(ValueError, match="missing column.*prompt_id"):
        balanced_groups(pa.table({"traj_id": ["t0"], "correct": [True]}), seed=0, epoch=0)
