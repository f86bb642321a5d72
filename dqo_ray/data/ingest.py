"""Ingest of external offline data (JSONL or Parquet) into the trajectory store.

Each record is one sampled response to one prompt:

    prompt              str, non-empty          (required)
    response            str, non-empty          (required)
    reward | correct    number | bool           (at least one; see below)
    prompt_id           str or int              (default: hash of dataset + prompt)
    dataset             str                     (default: the `dataset` argument, else the
                                                 file name without extension)
    behaviour_logprobs  list of numbers         one per response token, EOS included when
                                                 finish_reason is "stop" (default: null)
    finish_reason       "stop" | "length"       (default "stop")

With only `correct`, reward = reward_correct / reward_incorrect; with only `reward`,
correct = reward > 0. Other fields are ignored (and listed in the report).

Tokenisation matches what the generator produces for its own samples: the prompt goes through
the tokenizer's chat template as one user turn with the generation prompt appended (plain
tokenisation when there is no template), and a response that stopped gets the EOS token, the
action that ended the episode. External data gets policy_version -1, and behaviour_logprobs
null when not given: the off-policy correction then treats the unknown behaviour policy as
pi_ref (ratio 1 at initialisation), the best available assumption for data of unknown origin.

traj_id is a hash of (dataset, prompt, response, line), so ingesting the same file again gives
the same ids; rows whose id is already in the store are rejected as duplicates, which makes a
re-run (or the resumption of a crashed run) idempotent. Identical records on different lines
stay distinct samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dqo_ray.data.schema import TRAJECTORY_SCHEMA, RowError, validate_row
from dqo_ray.data.store import ShardInfo, TrajectoryStore
from dqo_ray.io import filesystem

__all__ = ["DUPLICATE_REASON", "IngestError", "IngestReport", "ingest_file"]

log = logging.getLogger(__name__)

DUPLICATE_REASON = "duplicate traj_id already in store"
RECORD_FIELDS = frozenset({"prompt", "response", "reward", "correct", "prompt_id", "dataset",
                           "behaviour_logprobs", "finish_reason"})
_CHUNK = 1024  # records tokenised together (fast tokenizers batch well)


class IngestError(Exception):
    """Ingest cannot proceed: an unreadable input, or (strict mode) the first bad record.

    `error` is the RowError of that record, when there is one.
    """

    def __init__(self, message: str, error: RowError | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclass
class IngestReport:
    """What one ingest did. total = written + len(rejected); one RowError per rejected record
    (its first problem); duplicates of rows already in the store are among the rejected."""

    source: str
    total: int = 0
    written: int = 0
    rejected: list[RowError] = field(default_factory=list)
    shards: list[ShardInfo] = field(default_factory=list)
    ignored_fields: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return sum(e.reason == DUPLICATE_REASON for e in self.rejected)

    def summary(self) -> str:
        """One line of counts, e.g. for the CLI."""
        return (f"{self.source}: {self.total} records, {self.written} written in "
                f"{len(self.shards)} shard(s), {len(self.rejected)} rejected "
                f"({self.duplicates} already in the store)")


# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------

def _jsonl_records(fs: pafs.FileSystem, path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(1-based line, parsed object or None, problem or None) per non-blank line."""
    with fs.open_input_stream(path) as raw:
        for line_no, line in enumerate(io.BufferedReader(raw), start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not records
            try:
                text = line.decode("utf-8")
                if line_no == 1:
                    text = text.removeprefix("\ufeff")  # editors on Windows add a BOM
            except UnicodeDecodeError as exc:
                yield line_no, None, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, None, f"is not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(record, dict):
                yield line_no, None, f"is a JSON {type(record).__name__}, not an object"
                continue
            yield line_no, record, None


def _parquet_records(fs: pafs.FileSystem, path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(0-based row index, record dict, None) per row."""
    with fs.open_input_file(path) as f:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_CHUNK):
            for record in batch.to_pylist():
                yield row, record, None
                row += 1


def _guarded(records: Iterator[tuple[int, Any, str | None]], path: str,
             report: IngestReport) -> Iterator[tuple[int, Any, str | None]]:
    """Turns an unreadable input (truncated Parquet, I/O error) into IngestError. It is not a
    bad record: ingest stops, keeping what non-strict mode already committed."""
    try:
        yield from records
    except (OSError, pa.ArrowException) as exc:
        raise IngestError(f"{path}: cannot read after {report.total} records: {exc}; "
                          f"{report.written} rows were written before this") from exc


# --------------------------------------------------------------------------------------------
# One record -> one trajectory row
# --------------------------------------------------------------------------------------------

def _hash(*parts: Any) -> str:
    # JSON of a list is unambiguous (no separator collisions between parts).
    return hashlib.sha1(json.dumps(list(parts), ensure_ascii=False).encode()).hexdigest()[:16]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer beyond float range
        return False


def _text(record: Mapping[str, Any], key: str) -> tuple[str | None, str | None]:
    """(value, problem) for a required non-empty string field."""
    if key not in record:
        return None, "is missing"
    value = record[key]
    if value is None:
        return None, "is null"
    if not isinstance(value, str):
        return None, f"is {type(value).__name__} {value!r:.40}, not a string"
    if not value.strip():
        return None, "is empty"
    return value, None


def _parse(record: Mapping[str, Any], default_dataset: str, reward_correct: float,
           reward_incorrect: float) -> tuple[dict[str, Any] | None, str, str]:
    """Checks the record's own fields -> (partial row, "", "") or (None, column, reason).

    Optional fields that are null count as absent (Parquet files have nulls where a JSONL
    record would leave the key out).
    """
    prompt, problem = _text(record, "prompt")
    if problem:
        return None, "prompt", problem
    response, problem = _text(record, "response")
    if problem:
        return None, "response", problem
    reward, correct = record.get("reward"), record.get("correct")
    if reward is not None and not (_is_number(reward) and _finite(reward)):
        return None, "reward", f"is {reward!r:.40}, not a finite number"
    if correct is not None and not isinstance(correct, bool):
        return None, "correct", f"is {correct!r:.40}, not a bool"
    if reward is None and correct is None:
        return None, "reward", "is missing (give reward, a number, or correct, a bool)"
    if reward is None:
        reward = reward_correct if correct else reward_incorrect
    if correct is None:
        correct = reward > 0
    dataset = record.get("dataset")
    if dataset is None:
        dataset = default_dataset
    elif not isinstance(dataset, str):
        return None, "dataset", f"is {dataset!r:.40}, not a string"
    prompt_id = record.get("prompt_id")
    if prompt_id is None:
        prompt_id = _hash(dataset, prompt)
    elif isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
        prompt_id = str(prompt_id)  # numeric ids (e.g. a dataset index) are common
    elif not isinstance(prompt_id, str) or not prompt_id:
        return None, "prompt_id", f"is {prompt_id!r:.40}, not a non-empty string or integer"
    finish_reason = record.get("finish_reason")
    if finish_reason is None:
        finish_reason = "stop"
    elif finish_reason not in ("stop", "length"):
        return None, "finish_reason", f"is {finish_reason!r:.40}, not one of 'stop', 'length'"
    logprobs = record.get("behaviour_logprobs")
    if logprobs is not None and not isinstance(logprobs, (list, tuple)):
        return None, "behaviour_logprobs", f"is {type(logprobs).__name__}, not a list"
    return {"prompt": prompt, "response": response, "reward": float(reward),
            "correct": bool(correct), "dataset": dataset, "prompt_id": prompt_id,
            "finish_reason": finish_reason,
            "behaviour_logprobs": None if logprobs is None else list(logprobs)}, "", ""


def _token_ids(encoded: Any) -> list[int]:
    """apply_chat_template / tokenizer output -> list[int] (transformers 5 returns a
    BatchEncoding from apply_chat_template(tokenize=True); older versions a plain list)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        if len(encoded) != 1:
            raise ValueError(f"expected one sequence of token ids, got {len(encoded)}")
        encoded = encoded[0]
    return [int(t) for t in encoded]


class _Tokenise:
    """Prompt (chat template, cached: many samples share a prompt) and response tokenisation."""

    def __init__(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise IngestError("the tokenizer has no EOS token; responses that stopped need one")
        self.tokenizer = tokenizer
        self.eos = int(tokenizer.eos_token_id)
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self._prompts: dict[str, list[int]] = {}

    def prompt(self, text: str) -> list[int]:
        ids = self._prompts.get(text)
        if ids is None:
            if self.chat:
                ids = _token_ids(self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True,
                    tokenize=True))
            else:
                ids = _token_ids(self.tokenizer(text))
            if len(self._prompts) < 100_000:
                self._prompts[text] = ids
        return ids

    def responses(self, texts: list[str], finish: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[int(t) for t in ids] + ([self.eos] if reason == "stop" else [])
                for ids, reason in zip(encoded, finish, strict=True)]


def _over_limit(row: Mapping[str, Any], max_prompt: int | None,
                max_response: int | None) -> tuple[str, str] | None:
    """(column, reason) when the row's prompt or response is longer than its limit."""
    for column, ids, limit, key in (("prompt", row["prompt_ids"], max_prompt, "max_prompt_tokens"),
                                    ("response", row["response_ids"], max_response,
                                     "max_response_tokens")):
        if limit is not None and len(ids) > limit:
            return column, (f"has {len(ids)} tokens, more than data.{key} ({limit}); raise "
                            "the limit or shorten the record")
    return None


# --------------------------------------------------------------------------------------------
# The ingest
# --------------------------------------------------------------------------------------------

def ingest_file(path: str, store: TrajectoryStore, tokenizer, *, round: int = 0,
                dataset: str | None = None, strict: bool = False, shard_rows: int = 4096,
                reward_correct: float = 1.0, reward_incorrect: float = 0.0,
                max_prompt_tokens: int | None = None,
                max_response_tokens: int | None = None) -> IngestReport:
    """Reads `path` (.jsonl or .parquet), tokenises, validates and writes it to `store`.

    Records are numbered by 1-based line (JSONL) or 0-based row (Parquet) in every message.
    Without `strict`, bad records are rejected (each with its line/row and reason in the
    report) and valid ones are written in shards of `shard_rows` as they accumulate. With
    `strict`, the first bad record raises IngestError naming file, line and reason; all
    records are checked before the first shard is written, so nothing is written then.
    Rows already in the store (same traj_id) are rejected as duplicates in both modes; they
    are not "bad", so a strict re-run is a no-op instead of an error. A row whose tokenised
    prompt or response is longer than `max_prompt_tokens` / `max_response_tokens`
    (data.max_prompt_tokens / data.max_response_tokens) is a bad record: rejected, never cut
    (a cut response would be graded on text it no longer has).
    """
    path = os.fspath(path)
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    lower = path.lower()
    if lower.endswith(".jsonl"):
        reader, unit = _jsonl_records, "line"
    elif lower.endswith(".parquet"):
        reader, unit = _parquet_records, "row"
    else:
        raise IngestError(f"{path}: unsupported input (expected a .jsonl or .parquet file)")
    try:
        fs, fs_path = filesystem(path)
        if fs.get_file_info(fs_path).type != pafs.FileType.File:
            raise IngestError(f"{path}: no such file")
    except (OSError, pa.ArrowException) as exc:
        raise IngestError(f"{path}: cannot open: {exc}") from exc
    stem = re.sub(r"\.(jsonl|parquet)$", "", os.path.basename(fs_path), flags=re.I)
    default_dataset = dataset if dataset is not None else stem
    tokenise = _Tokenise(tokenizer)
    existing = store.traj_ids()
    report = IngestReport(source=path)
    ignored: set[str] = set()
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    name_stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:40] or "data"
    pending: list[dict[str, Any]] = []   # valid rows not yet in a shard
    staged: list[pa.Table] = []          # strict mode: complete shards held until the end

    def reject(row_no: int, traj_id: str | None, column: str, reason: str) -> None:
        error = RowError(path, row_no, traj_id, column, reason, unit)
        if strict and reason != DUPLICATE_REASON:
            raise IngestError(f"{error}\n(strict ingest of {path} stopped at the first bad "
                              "record; nothing was written)", error)
        report.rejected.append(error)

    def flush(final: bool) -> None:
        while len(pending) >= shard_rows or (final and pending):
            rows, pending[:] = pending[:shard_rows], pending[shard_rows:]
            table = pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)
            if strict:
                staged.append(table)
            else:
                write(table)

    def write(table: pa.Table) -> None:
        name = f"ingest-{name_stem}-{run_id}-{len(report.shards):05d}"
        report.shards.append(store.write_shard(table, round, name=name))
        report.written += table.num_rows
        log.info("ingest %s: %d rows written so far", path, report.written)

    def process(chunk: list[tuple[int, Any, str | None]]) -> None:
        # Parse all, tokenise the parsable ones in one batch, then judge in file order, so
        # rejections are reported (and strict mode stops) at the first bad line.
        parsed: list[tuple[dict[str, Any] | None, str, str]] = []
        for _, record, problem in chunk:
            if problem is not None:
                parsed.append((None, "", problem))
                continue
            ignored.update(k for k in record if k not in RECORD_FIELDS)
            parsed.append(_parse(record, default_dataset, reward_correct, reward_incorrect))
        ok = [row for row, _, _ in parsed if row is not None]
        responses = iter(tokenise.responses([r["response"] for r in ok],
                                            [r["finish_reason"] for r in ok]))
        for (row_no, _, _), (row, column, reason) in zip(chunk, parsed, strict=True):
            if row is None:
                reject(row_no, None, column, reason)
                continue
            response_ids = next(responses)
            traj_id = _hash(row["dataset"], row["prompt"], row["response"], row_no)
            row.update(traj_id=traj_id, round=round, policy_version=-1,
                       prompt_ids=tokenise.prompt(row["prompt"]), response_ids=response_ids,
                       step_ends=None, step_rewards=None, step_values=None,
                       ref_logprobs=None)
            logprobs = row["behaviour_logprobs"]
            if logprobs is not None and len(logprobs) != len(response_ids):
                eos = " (EOS included)" if row["finish_reason"] == "stop" else ""
                reject(row_no, traj_id, "behaviour_logprobs", f"has {len(logprobs)} entries "
                       f"for {len(response_ids)} response tokens{eos}")
                continue
            problems = validate_row(row)
            if problems:
                reject(row_no, traj_id, *problems[0])
            elif too_long := _over_limit(row, max_prompt_tokens, max_response_tokens):
                reject(row_no, traj_id, *too_long)
            elif traj_id in existing:
                reject(row_no, traj_id, "traj_id", DUPLICATE_REASON)
            else:
                pending.append(row)
        flush(final=False)

    chunk: list[tuple[int, Any, str | None]] = []
    for item in _guarded(reader(fs, fs_path), path, report):
        report.total += 1
        chunk.append(item)
        if len(chunk) >= _CHUNK:
            process(chunk)
            chunk = []
    process(chunk)
    flush(final=True)
    for table in staged:
        write(table)
    report.ignored_fields = sorted(ignored)
    if ignored:
        log.warning("ingest %s: ignored fields %s (known: %s)", path, report.ignored_fields,
                    sorted(RECORD_FIELDS))
    log.info("ingest %s", report.summary())
    return report
