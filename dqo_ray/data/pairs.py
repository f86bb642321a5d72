"""Preference pairs for DPO (pure pyarrow; the Ray Data pipeline applies it per prompt).

`dpo_loss` reads a micro-batch as interleaved rows: 2i chosen (a correct response), 2i+1
rejected (an incorrect response to the same prompt). `preference_pairs` builds such pairs
from the rows of one epoch, after round mixing (`MixAndKey`: copies and `order_key` are
already there). Choices:

- Pairs per prompt: rows are grouped by `prompt_id`; a prompt with c correct and i incorrect
  rows gives min(c, i) pairs, each row in at most one pair. A prompt with only correct or
  only incorrect rows gives none (DPO has nothing to compare there); the leftover rows of
  the larger side are not used this epoch.
- Which rows meet: each side is ranked by `hash63("pair", seed, epoch, traj_id)` (ties, i.e.
  copies of one trajectory, by `order_key`) and the two rankings are zipped. The ranking
  changes with the epoch, so a prompt with several candidates meets other partners (and
  leaves other rows out) from epoch to epoch. It is not the order key on purpose: picking
  the rows with the smallest order keys would put the pairs of unbalanced prompts early in
  every epoch.
- Round weights act before pairing: rows arrive with `copies_per_row`'s copies, so a round
  of weight 2 brings each of its rows twice and its prompts form up to twice the pairs; a
  weight < 1 leaves some rows out before pairing. A weight is defined per trajectory, and
  the two rows of a pair may come from rounds of different weights, so weighting pairs
  afterwards would need a rule of its own.
- Order: both rows of a pair take the chosen row's `order_key` (a uniform hash, unique per
  row copy while traj_ids are unique in the store, as ingest and the generator ensure) and
  a `pair_pos` column (0 chosen, 1 rejected), so a sort by (order_key, pair_pos) keeps each
  pair adjacent, chosen first, and orders the pairs as reproducibly as an unpaired epoch.
- The result does not depend on the order of the input rows (Ray's groupby may deliver a
  prompt's rows in any order); rows come out pair by pair.
"""

from __future__ import annotations

import pyarrow as pa

from dqo_ray.data.order import hash63

PAIR_COLUMNS = ("traj_id", "prompt_id", "correct", "order_key")


def preference_pairs(table: pa.Table, seed: int, epoch: int) -> pa.Table:
    """Rows of `table` (one or many prompts) -> interleaved (chosen, rejected) rows of the
    same prompt, with the pair's `order_key` on both rows and `pair_pos` (int8: 0 chosen,
    1 rejected). Other columns are carried as they are.

    Raises ValueError naming the missing columns when one of PAIR_COLUMNS is absent."""
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"preference_pairs: missing column(s) {', '.join(missing)}; pairing "
                         f"needs {', '.join(PAIR_COLUMNS)} (the table has "
                         f"{', '.join(table.column_names) or 'no column'})")
    traj_ids = table.column("traj_id").to_pylist()
    keys = table.column("order_key").to_pylist()
    sides: dict[str, tuple[list, list]] = {}  # prompt_id -> (correct rows, incorrect rows)
    for i, (prompt, ok) in enumerate(zip(table.column("prompt_id").to_pylist(),
                                         table.column("correct").to_pylist(), strict=True)):
        rank = (hash63("pair", seed, epoch, traj_ids[i]), traj_ids[i], keys[i])
        sides.setdefault(prompt, ([], []))[0 if ok else 1].append((rank, i))

    index: list[int] = []
    for prompt in sorted(sides):
        chosen, rejected = (sorted(rows) for rows in sides[prompt])
        for (_, c), (_, r) in zip(chosen, rejected, strict=False):  # min(c, i) pairs
            index += [c, r]
    out = table.take(pa.array(index, type=pa.int64()))
    pair_keys = [keys[c] for c in index[0::2] for _ in range(2)]
    out = out.set_column(out.column_names.index("order_key"), "order_key",
                         pa.array(pair_keys, type=pa.int64()))
    return out.append_column("pair_pos", pa.array([0, 1] * (len(index) // 2), type=pa.int8()))
