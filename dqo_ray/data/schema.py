"""The trajectory schema: one row per (prompt, response) sample, and the row validator.

A trajectory row is the unit every stage reads and writes through the store:

    traj_id             str          unique key across the whole store
    prompt_id           str          groups the samples of one prompt
    round               int32        generation round (0 = offline / ingested data)
    policy_version      int32        checkpoint that sampled it; -1 = external data
    dataset             str
    prompt, response    str          text (response may be "" when only EOS was sampled)
    prompt_ids          list<int32>  chat-templated prompt tokens, non-empty
    response_ids        list<int32>  response tokens (EOS included when it stopped), non-empty
    behaviour_logprobs  list<float32> | null   log mu(a_h|s_h) per response token; null =
                                                unknown behaviour policy (treated as pi_ref)
    reward              float32      outcome reward, placed on the last response token
    correct             bool
    finish_reason       str          "stop" (ended with EOS) or "length" (cut at the limit)
    step_ends           list<int32> | null     response-token index where each step ends
    step_rewards        list<float32> | null   shaped reward per step (needs step_ends)
    step_values         list<float32> | null   Monte-Carlo P(correct) from the state where
                                                each step starts (one per step_ends entry)
    ref_logprobs        list<float32> | null   log pi_ref(a_h|s_h); null until the reference
                                                stage fills it

Every Arrow field is declared nullable, even those the validator requires: Arrow nullability
flags do not survive the round trips through pandas/numpy that Ray Data batches make, and a
schema that differs only in those flags would then refuse to cast. "Required" is enforced by
`validate_rows` instead, which also checks what Arrow cannot (lengths, ranges, uniqueness).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TRAJECTORY_SCHEMA = pa.schema([
    ("traj_id", pa.string()),
    ("prompt_id", pa.string()),
    ("round", pa.int32()),
    ("policy_version", pa.int32()),
    ("dataset", pa.string()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("behaviour_logprobs", pa.list_(pa.float32())),
    ("reward", pa.float32()),
    ("correct", pa.bool_()),
    ("finish_reason", pa.string()),
    ("step_ends", pa.list_(pa.int32())),
    ("step_rewards", pa.list_(pa.float32())),
    ("step_values", pa.list_(pa.float32())),
    ("ref_logprobs", pa.list_(pa.float32())),
])
COLUMNS: tuple[str, ...] = tuple(TRAJECTORY_SCHEMA.names)
NULLABLE_COLUMNS = frozenset({"behaviour_logprobs", "step_ends", "step_rewards", "step_values",
                              "ref_logprobs"})
"""Columns whose value may be null (or the key absent from a row dict)."""
FINISH_REASONS = ("stop", "length")
LOGPROB_TOLERANCE = 1e-4
"""Largest positive log-prob accepted: engines computing log-softmax in bf16/fp16 round a
probability of ~1 to a tiny positive log-prob; anything larger is not a log-probability."""
MAX_ERRORS_SHOWN = 20

_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class StoreError(Exception):
    """Invalid trajectory data, or a store operation that cannot be carried out."""


@dataclass(frozen=True)
class RowError:
    """One problem with one row: where it is (`source`, `row`), which column, and why.

    `unit` names what `row` counts: "row" (0-based index into a batch or Parquet file) or
    "line" (1-based line of a JSONL file), so messages point at what a person can open.
    `column` is "" for problems of the whole record (e.g. a line that is not JSON).
    """

    source: str
    row: int
    traj_id: str | None
    column: str
    reason: str
    unit: str = "row"

    def __str__(self) -> str:
        where = f"{self.source} {self.unit} {self.row}"
        if self.traj_id is not None:
            where += f" (traj_id={self.traj_id})"
        return f"{where}: {self.column}: {self.reason}" if self.column else \
            f"{where}: {self.reason}"


# --------------------------------------------------------------------------------------------
# Per-value checks: each returns a reason string, or None when the value is fine
# --------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    # bool is an Integral subclass; True must never pass for a token id or round number.
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))


def _finite32(value: Any) -> bool:
    """A real number that float32 holds as a finite value (huge Python ints included)."""
    try:
        return math.isfinite(value) and abs(value) <= _FLOAT32_MAX
    except OverflowError:  # an int beyond float range
        return False


def _as_list(value: Any) -> list | None:
    """Lists, tuples and 1-d numpy arrays (Ray Data batches) as a list; anything else None."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim == 1 else None
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def _check_str(value: Any, non_empty: bool) -> str | None:
    if not isinstance(value, str):
        return f"is {type(value).__name__} {value!r:.40}, not a string"
    if non_empty and not value:
        return "is empty"
    return None


def _check_int32(value: Any, lo: int) -> str | None:
    if not _is_int(value):
        return f"is {type(value).__name__} {value!r:.40}, not an integer"
    if not lo <= value <= _INT32_MAX:
        return f"is {value}, outside [{lo}, {_INT32_MAX}]"
    return None


def _check_float32(value: Any) -> str | None:
    if not _is_real(value):
        return f"is {type(value).__name__} {value!r:.40}, not a number"
    if not _finite32(value):
        return f"is {value!r:.40}, not a finite float32"
    return None


def _check_int_list(values: list) -> str | None:
    # Screen at C speed (element types, then numpy range); the exact per-element loop below
    # only runs to name the first bad entry. Lists of 10^6 tokens per shard make this matter.
    if set(map(type, values)) <= {int}:
        try:
            arr = np.asarray(values, dtype=np.int64)
        except OverflowError:
            arr = None
        if arr is not None and (not arr.size or (arr.min() >= 0 and arr.max() <= _INT32_MAX)):
            return None
    for i, v in enumerate(values):
        if not _is_int(v):
            return f"entry {i} is {type(v).__name__} {v!r:.40}, not an integer"
        if not 0 <= v <= _INT32_MAX:
            return f"entry {i} is {v}, outside [0, {_INT32_MAX}]"
    return None


def _check_float_list(values: list, max_value: float = _FLOAT32_MAX) -> str | None:
    if set(map(type, values)) <= {float, int}:  # the fast screen, as in _check_int_list
        try:
            arr = np.asarray(values, dtype=np.float64)
        except OverflowError:
            arr = None
        if arr is not None and (not arr.size or (
                np.isfinite(arr).all() and np.abs(arr).max() <= _FLOAT32_MAX
                and arr.max() <= max_value)):
            return None
    for i, v in enumerate(values):
        if not _is_real(v):
            return f"entry {i} is {type(v).__name__} {v!r:.40}, not a number"
        if not _finite32(v):
            return f"entry {i} is {v!r:.40}, not finite"
        if v > max_value:
            return f"entry {i} is {v} > 0 (log-probabilities are <= 0)"
    return None


def _check_logprobs(values: list) -> str | None:
    return _check_float_list(values, LOGPROB_TOLERANCE)


_SCALAR_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "traj_id": lambda v: _check_str(v, non_empty=True),
    "prompt_id": lambda v: _check_str(v, non_empty=True),
    "round": lambda v: _check_int32(v, lo=0),
    "policy_version": lambda v: _check_int32(v, lo=-1),
    "dataset": lambda v: _check_str(v, non_empty=False),
    "prompt": lambda v: _check_str(v, non_empty=False),
    "response": lambda v: _check_str(v, non_empty=False),
    "reward": _check_float32,
    "correct": lambda v: None if isinstance(v, (bool, np.bool_))
    else f"is {type(v).__name__} {v!r:.40}, not a bool",
    "finish_reason": lambda v: _check_str(v, non_empty=False) or (
        None if v in FINISH_REASONS else f"is {v!r}, not one of 'stop', 'length'"),
}
_LIST_CHECKS: dict[str, Callable[[list], str | None]] = {
    "prompt_ids": _check_int_list,
    "response_ids": _check_int_list,
    "behaviour_logprobs": _check_logprobs,
    "step_ends": _check_int_list,
    "step_rewards": _check_float_list,
    "step_values": lambda v: _check_float_list(v) or (
        None if all(0 <= x <= 1 for x in v) else f"{v!r:.60} has an entry outside [0, 1]"),
    "ref_logprobs": _check_logprobs,
}


def validate_row(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """All problems of one row dict as (column, reason) pairs; [] when the row is valid.

    Checks presence and type of every column, then the relations between columns (per-token
    lists as long as the response, step boundaries inside it). Nullable columns may be
    absent. Uniqueness of traj_id is a property of a batch: see `validate_rows`.
    """
    problems: list[tuple[str, str]] = []
    for key in row:
        if key not in _SCALAR_CHECKS and key not in _LIST_CHECKS:
            close = difflib.get_close_matches(str(key), COLUMNS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append((str(key), f"is not a trajectory column{hint}"))
    lists: dict[str, list | None] = {}
    for column in COLUMNS:
        value = row.get(column)
        if value is None:
            if column not in NULLABLE_COLUMNS:
                problems.append((column, "is missing" if column not in row else "is null"))
            lists[column] = None
            continue
        if column in _SCALAR_CHECKS:
            reason = _SCALAR_CHECKS[column](value)
        else:
            values = _as_list(value)
            lists[column] = values
            reason = (f"is {type(value).__name__} {value!r:.40}, not a list" if values is None
                      else _LIST_CHECKS[column](values))
            if reason is None and not values and column in ("prompt_ids", "response_ids"):
                reason = "is empty"
        if reason is not None:
            problems.append((column, reason))
            lists[column] = None  # no relational checks on a column already known bad
    response = lists["response_ids"]
    if response is None:
        return problems
    n = len(response)
    for column in ("behaviour_logprobs", "ref_logprobs"):
        values = lists[column]
        if values is not None and len(values) != n:
            problems.append((column, f"has {len(values)} entries for {n} response tokens"))
    ends = lists["step_ends"]
    if ends is not None:
        if any(not 0 <= e < n for e in ends):
            problems.append(("step_ends", f"{ends!r:.60} has an entry outside [0, {n})"))
        elif any(b <= a for a, b in zip(ends, ends[1:], strict=False)):
            problems.append(("step_ends", f"{ends!r:.60} is not strictly increasing"))
    for column in ("step_rewards", "step_values"):
        per_step = lists[column]
        if per_step is None:
            continue
        if row.get("step_ends") is None:
            problems.append((column, "is given without step_ends"))
        elif ends is not None and len(ends) != len(per_step):
            problems.append((column, f"has {len(per_step)} entries for {len(ends)} step_ends"))
    return problems


def validate_rows(rows: Sequence[Mapping[str, Any]], source: str) -> list[RowError]:
    """Every problem of every row (see `validate_row`), plus traj_ids repeated in the batch.

    `source` names the batch in messages (a file name, "write_shard(round=2)", ...); row
    numbers are 0-based indices into `rows`.
    """
    errors: list[RowError] = []
    first_seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        traj_id = row.get("traj_id")
        traj_id = traj_id if isinstance(traj_id, str) else None
        errors.extend(RowError(source, i, traj_id, column, reason)
                      for column, reason in validate_row(row))
        if traj_id is not None:
            if traj_id in first_seen:
                errors.append(RowError(source, i, traj_id, "traj_id",
                                       f"duplicate traj_id (first at row {first_seen[traj_id]})"))
            else:
                first_seen[traj_id] = i
    return errors


def _table_suspects(table: pa.Table) -> np.ndarray:
    """Boolean mask [num_rows] of rows that may break a rule of `validate_row`, computed with
    Arrow kernels over whole columns (the table must already have TRAJECTORY_SCHEMA)."""
    bad = np.zeros(table.num_rows, dtype=bool)
    cols = {c: table.column(c).combine_chunks() for c in COLUMNS}

    def rows(mask: pa.Array) -> None:  # a per-row mask; null (a null input) counts as fine
        bad[pc.fill_null(mask, False).to_numpy(zero_copy_only=False)] = True

    def elements(column: str, mask: pa.Array) -> np.ndarray:  # a per-element mask
        hit = pc.fill_null(mask, True).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(cols[column]).to_numpy()
        bad[parents[hit]] = True
        return parents

    for column in COLUMNS:
        if column not in NULLABLE_COLUMNS:
            rows(pc.is_null(cols[column]))
    for column in ("traj_id", "prompt_id"):
        rows(pc.equal(pc.utf8_length(cols[column]), 0))
    rows(pc.less(cols["round"], 0))
    rows(pc.less(cols["policy_version"], -1))
    rows(pc.invert(pc.is_finite(cols["reward"])))
    rows(pc.invert(pc.is_in(cols["finish_reason"], value_set=pa.array(FINISH_REASONS))))
    response_len = pc.list_value_length(cols["response_ids"])
    for column in ("prompt_ids", "response_ids"):
        rows(pc.equal(pc.list_value_length(cols[column]), 0))
    for column in ("prompt_ids", "response_ids", "step_ends"):
        elements(column, pc.less(pc.list_flatten(cols[column]), 0))
    for column in ("behaviour_logprobs", "ref_logprobs", "step_rewards", "step_values"):
        # float64 so the bound compares exactly as the Python check does
        flat = pc.cast(pc.list_flatten(cols[column]), pa.float64())
        mask = pc.invert(pc.is_finite(flat))
        if column in ("behaviour_logprobs", "ref_logprobs"):
            mask = pc.or_(mask, pc.greater(flat, LOGPROB_TOLERANCE))
            rows(pc.not_equal(pc.list_value_length(cols[column]), response_len))
        elif column == "step_values":
            mask = pc.or_(mask, pc.or_(pc.less(flat, 0), pc.greater(flat, 1)))
        elements(column, mask)
    ends = pc.list_flatten(cols["step_ends"])
    parents = pc.list_parent_indices(cols["step_ends"]).to_numpy()
    ends_np = pc.fill_null(ends, 0).to_numpy()
    limit = pc.fill_null(response_len, 0).to_numpy()
    bad[parents[ends_np >= limit[parents]]] = True
    same_row = parents[1:] == parents[:-1]
    bad[parents[1:][same_row & (ends_np[1:] <= ends_np[:-1])]] = True
    for column in ("step_rewards", "step_values"):
        rows(pc.and_(pc.is_valid(cols[column]), pc.is_null(cols["step_ends"])))
        rows(pc.not_equal(pc.list_value_length(cols[column]),
                          pc.list_value_length(cols["step_ends"])))
    return bad


def validate_table(table: pa.Table, source: str) -> list[RowError]:
    """`validate_rows` for a table with TRAJECTORY_SCHEMA, vectorised.

    Arrow kernels screen every row; only the rows they flag are converted to dicts and run
    through `validate_row`, for the exact messages. A 4096 x 512-token shard takes
    milliseconds instead of the seconds a per-element Python loop needs.
    """
    if not table.schema.equals(TRAJECTORY_SCHEMA):
        raise StoreError(f"{source}: validate_table needs TRAJECTORY_SCHEMA, got {table.schema}")
    suspects = np.flatnonzero(_table_suspects(table))
    errors: list[RowError] = []
    for i, row in zip(suspects.tolist(), table.take(suspects).to_pylist(), strict=True):
        problems = validate_row(row) or [("", "failed the table checks")]  # never expected
        errors.extend(RowError(source, i, row.get("traj_id"), column, reason)
                      for column, reason in problems)
    first_seen: dict[str, int] = {}
    for i, traj_id in enumerate(table.column("traj_id").to_pylist()):
        if traj_id is None:
            continue
        if traj_id in first_seen:
            errors.append(RowError(source, i, traj_id, "traj_id",
                                   f"duplicate traj_id (first at row {first_seen[traj_id]})"))
        else:
            first_seen[traj_id] = i
    errors.sort(key=lambda e: e.row)
    return errors


def format_errors(errors: Sequence[RowError], head: str) -> str:
    """`head` plus the first MAX_ERRORS_SHOWN errors, one a line, and how many were left out."""
    lines = [f"{head}: {len(errors)} problem(s)"]
    lines += [f"  {e}" for e in errors[:MAX_ERRORS_SHOWN]]
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


def rows_to_table(rows: Sequence[Mapping[str, Any]], source: str = "rows") -> pa.Table:
    """Validated row dicts -> a table with exactly TRAJECTORY_SCHEMA (absent nullable -> null).

    Raises StoreError listing the first MAX_ERRORS_SHOWN problems and their total count.
    """
    errors = validate_rows(rows, source)
    if errors:
        raise StoreError(format_errors(errors, f"invalid trajectories in {source}"))
    return unchecked_rows_to_table(rows)


def unchecked_rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """`rows_to_table` without validation, for rows already passed by `validate_rows`."""
    # Arrow converts numpy arrays and scalars itself, and absent nullable keys become null.
    return pa.Table.from_pylist(list(rows), schema=TRAJECTORY_SCHEMA)


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """A trajectory table -> one plain dict per row (lists as Python lists, nulls as None)."""
    return table.to_pylist()
