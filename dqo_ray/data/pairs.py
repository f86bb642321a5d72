"""Preference pairs for DPO (pure pyarrow; the Ray Data pipeline applies it per prompt).

`dpo_loss` reads a batch as interleaved (chosen, rejected) rows of the same prompt. From the
rows of one epoch (after round mixing, so each row already carries its `order_key`):

- rows are grouped by `prompt_id`; within a prompt, the correct rows and the incorrect rows
  are each sorted by `order_key` and zipped, so a prompt with c correct and i incorrect rows
  gives min(c, i) pairs, and which rows meet changes from epoch to epoch with the order keys;
- a prompt with only correct or only incorrect rows gives no pair (DPO has nothing to
  compare there); rows left over on the larger side are not used this epoch;
- round weights act before pairing: a round of weight 2 brings each row twice, so its
  prompts form up to twice the pairs;
- both rows of a pair get the chosen row's `order_key` and a `pair_pos` (0 chosen,
  1 rejected), so sorting the epoch by (order_key, pair_pos) keeps pairs adjacent, chosen
  first, in an order as deterministic as the unpaired one.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

PAIR_COLUMNS = ("prompt_id", "correct", "order_key")


def preference_pairs(table: pa.Table) -> pa.Table:
    """Rows of `table` (any prompts) -> interleaved (chosen, rejected) pairs with `pair_pos`.

    Raises ValueError naming the columns it needs when one is missing."""
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"preference_pairs: missing column(s) {', '.join(missing)}; "
                         f"pairing needs {', '.join(PAIR_COLUMNS)} (has "
                         f"{', '.join(table.column_names)})")
    prompts = table.column("prompt_id").to_pylist()
    correct = table.column("correct").to_pylist()
    keys = table.column("order_key").to_pylist()
    by_prompt: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, (prompt, ok) in enumerate(zip(prompts, correct, strict=True)):
        by_prompt[prompt][0 if ok else 1].append(i)

    index: list[int] = []
    for chosen, rejected in by_prompt.values():
        chosen.sort(key=keys.__getitem__)
        rejected.sort(key=keys.__getitem__)
        for c, r in zip(chosen, rejected, strict=False):  # min(c, i) pairs
            index += [c, r]
    out = table.take(pa.array(index, type=pa.int64()))
    pair_keys = [keys[c] for c in index[0::2] for _ in range(2)]
    out = out.set_column(out.column_names.index("order_key"), "order_key",
                         pa.array(pair_keys, type=pa.int64()))
    return out.append_column("pair_pos", pa.array([0, 1] * (len(index) // 2), type=pa.int8()))
