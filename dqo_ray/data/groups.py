"""Per-prompt outcome groups of the stored samples (pure): how many prompts have both correct
and incorrect samples, and the balanced selection of them (`data.prompt_groups`). Only mixed
prompts carry a comparison for outcome-reward learning; a prompt whose samples all fail (or
all succeed) gives DQO and DPO nothing to tell apart."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from dqo_ray.data.order import hash63


def outcome_mix(prompt_ids: Iterable[str], correct: Iterable[bool]) -> dict[str, float]:
    """Shares of prompts whose samples are mixed, all correct or all wrong, and the prompt
    count: {"mixed_prompt_frac", "all_correct_prompt_frac", "all_wrong_prompt_frac",
    "prompts"}."""
    seen: dict[str, set[bool]] = {}
    for prompt, ok in zip(prompt_ids, correct, strict=True):
        seen.setdefault(prompt, set()).add(bool(ok))
    n = len(seen)
    if n == 0:
        return {"mixed_prompt_frac": 0.0, "all_correct_prompt_frac": 0.0,
                "all_wrong_prompt_frac": 0.0, "prompts": 0}
    return {"mixed_prompt_frac": sum(len(s) == 2 for s in seen.values()) / n,
            "all_correct_prompt_frac": sum(s == {True} for s in seen.values()) / n,
            "all_wrong_prompt_frac": sum(s == {False} for s in seen.values()) / n,
            "prompts": n}


def require_mixed(mix: dict[str, float], setting: str, store: str) -> None:
    """Raises a ValueError naming `setting` when no prompt of `mix` (outcome_mix) has both a
    correct and an incorrect sample: `setting` trains only on those, so it has nothing."""
    if mix["mixed_prompt_frac"] == 0:
        raise ValueError(f"store {store!r}: none of its {mix['prompts']} prompts has both a "
                         f"correct and an incorrect sample, and {setting} trains only on such "
                         "prompts (sample more per prompt: generation.samples_per_prompt)")


def balanced_groups(table: pa.Table, seed: int, epoch: int) -> pa.Table:
    """The rows of `table` (one or many prompts) that form balanced outcome groups: a prompt
    with c correct and i incorrect rows keeps min(c, i) of each (chosen per epoch by a hash of
    (seed, epoch, traj_id), so other rows take their turn in other epochs); a prompt with one
    outcome only keeps none. Rows keep their columns and `order_key`.

    Why: with outcome rewards only, an all-wrong prompt pushes every token of its samples
    down and nothing pulls back, and an unbalanced group makes the majority's push dominate.
    OREO (arXiv 2412.16145) keeps at most 4 correct and 4 incorrect samples per question;
    DAPO (arXiv 2503.14476) drops groups whose samples all agree."""
    missing = [c for c in ("traj_id", "prompt_id", "correct") if c not in table.column_names]
    if missing:
        raise ValueError(f"balanced_groups: missing column(s) {', '.join(missing)} (the table "
                         f"has {', '.join(table.column_names) or 'no column'})")
    traj_ids = table.column("traj_id").to_pylist()
    sides: dict[str, tuple[list, list]] = {}  # prompt_id -> (correct rows, incorrect rows)
    for i, (prompt, ok) in enumerate(zip(table.column("prompt_id").to_pylist(),
                                         table.column("correct").to_pylist(), strict=True)):
        rank = (hash63("group", seed, epoch, traj_ids[i]), traj_ids[i], i)
        sides.setdefault(prompt, ([], []))[0 if ok else 1].append((rank, i))
    index: list[int] = []
    for prompt in sorted(sides):
        right, wrong = (sorted(rows) for rows in sides[prompt])
        k = min(len(right), len(wrong))
        index += [i for _, i in right[:k]] + [i for _, i in wrong[:k]]
    return table.take(pa.array(sorted(index), type=pa.int64()))
