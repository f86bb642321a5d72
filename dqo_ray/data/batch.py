"""Ragged trajectories -> one padded batch of tensors (pure; the Ray Data collate wraps it).

Layout: each row is prompt_ids + response_ids in one sequence of length L. Per-token fields
(behaviour/ref log-probs, rewards) are placed at the positions of the response tokens they
belong to; the train step shifts by one (logits at position t score token t+1), so token
quantities and their predicting positions line up:

    input_ids       p0 p1 p2 a0 a1 a2 <pad>
    response_mask    0  0  0  1  1  1  0
    rewards          0  0  0  0  0  R  0    (outcome on the last token + shaped step rewards)

With `step_values` in every row (Monte-Carlo process supervision), each response token also
gets the success rate measured where its reasoning step starts, and `step_starts` marks the
first token of each step (steps ending at a0 and a2 here):

    step_values      0  0  0 p0 p1 p1  0
    step_starts      0  0  0  1  1  0  0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

TOKEN_FIELDS = ("behaviour_logprobs", "ref_logprobs")


def _row_error(i: int, row: Mapping[str, Any], message: str) -> ValueError:
    ident = row.get("traj_id", f"row {i}")
    return ValueError(f"trajectory {ident}: {message}")


def pad_trajectories(
    rows: Sequence[Mapping[str, Any]],
    pad_id: int,
    side: Literal["right", "left"] = "right",
    pad_to_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Collates trajectory rows into padded tensors.

    Each row needs `prompt_ids`, `response_ids` (non-empty), `reward`, `finish_reason`, and may
    carry `behaviour_logprobs` / `ref_logprobs` (one per response token), `correct` (default
    reward > 0),
    `step_ends` + `step_rewards` (response-token index and shaped reward per step),
    `step_values` (success rate where each step starts; needs step_ends).

    Returns [B, L] int64 `input_ids`, bool `attention_mask` / `response_mask`, float32
    `rewards` and the per-token fields present in every row (with `step_values`, also float32
    `step_values` and bool `step_starts`, see the module doc); [B] `truncated` (finish_reason
    == "length"), `correct` (bool), `returns` (total reward, float32).
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]
    length = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    batch_size = len(rows)
    input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
    attention = torch.zeros(batch_size, length, dtype=torch.bool)
    response = torch.zeros(batch_size, length, dtype=torch.bool)
    rewards = torch.zeros(batch_size, length)
    present = [f for f in TOKEN_FIELDS if all(r.get(f) is not None for r in rows)]
    token_fields = {f: torch.zeros(batch_size, length) for f in present}
    with_steps = all(r.get("step_values") is not None for r in rows)
    if with_steps:
        token_fields["step_values"] = torch.zeros(batch_size, length)
        step_starts = torch.zeros(batch_size, length, dtype=torch.bool)
    for i, row in enumerate(rows):
        prompt, resp = list(row["prompt_ids"]), list(row["response_ids"])
        if not resp:
            raise _row_error(i, row, "response_ids is empty")
        start = length - lengths[i] if side == "left" else 0
        resp_start, end = start + len(prompt), start + lengths[i]
        input_ids[i, start:end] = torch.as_tensor(prompt + resp, dtype=torch.long)
        attention[i, start:end] = True
        response[i, resp_start:end] = True
        for f in present:
            values = row[f]
            if len(values) != len(resp):
                raise _row_error(i, row, f"{f} has {len(values)} entries for {len(resp)} "
                                 "response tokens")
            token_fields[f][i, resp_start:end] = torch.as_tensor(list(values),
                                                                 dtype=torch.float32)
        rewards[i, end - 1] += float(row["reward"])
        step_ends, step_rewards = row.get("step_ends"), row.get("step_rewards")
        if step_rewards is not None and len(step_rewards):
            if step_ends is None or len(step_ends) != len(step_rewards):
                raise _row_error(i, row, "step_rewards needs one step_ends entry per reward")
            for pos, value in zip(step_ends, step_rewards, strict=True):
                if not 0 <= pos < len(resp):
                    raise _row_error(i, row, f"step_ends entry {pos} is outside the "
                                     f"{len(resp)}-token response")
                rewards[i, resp_start + pos] += float(value)
        if with_steps:
            starts = _step_starts(i, row, len(resp))
            for k, (begin, p) in enumerate(zip(starts, row["step_values"], strict=True)):
                stop = starts[k + 1] if k + 1 < len(starts) else len(resp)
                token_fields["step_values"][i, resp_start + begin:resp_start + stop] = float(p)
                step_starts[i, resp_start + begin] = True
    out = {"input_ids": input_ids, "attention_mask": attention, "response_mask": response,
           "rewards": rewards, **token_fields,
           "truncated": torch.tensor([r["finish_reason"] == "length" for r in rows]),
           "correct": torch.tensor([bool(r.get("correct", r["reward"] > 0)) for r in rows]),
           "returns": torch.tensor([float(r["reward"]) + _total(r.get("step_rewards"))
                                    for r in rows])}
    if with_steps:
        out["step_starts"] = step_starts
    return out


def _total(values: Sequence[float] | None) -> float:
    """Sum of an optional list (Ray Data hands lists over as numpy arrays: no truth value)."""
    return 0.0 if values is None else float(sum(values))


def _step_starts(i: int, row: Mapping[str, Any], n: int) -> list[int]:
    """Response-token index where each step starts: 0, then one past each step end."""
    ends = row.get("step_ends")
    if ends is None or len(ends) != len(row["step_values"]):
        raise _row_error(i, row, "step_values needs one step_ends entry per value")
    if ends[-1] != n - 1:
        raise _row_error(i, row, f"step_ends must end at the last response token ({n - 1})")
    return [0, *(int(e) + 1 for e in ends[:-1])]
