"""Ingest of external JSONL / Parquet files: counts, rejected lines with reasons, strict mode,
idempotent re-ingest, tokenisation, and the jobs.ingest CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dqo_ray.data.ingest import DUPLICATE_REASON, IngestError, ingest_file
from dqo_ray.data.store import TrajectoryStore

PROMPT = "Tom has 3 apples. Tom gives away 1. How many left?"
GOOD = "Tom has 3 apples. Tom gives away 1. so the answer is 2."
WRONG = "the answer is 4"


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    from dqo_ray.models import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture
def store(tmp_path) -> TrajectoryStore:
    return TrajectoryStore(tmp_path / "store")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def rejected(report) -> list[tuple[int, str, str]]:
    return [(e.row, e.column, e.reason) for e in report.rejected]


MIXED = [
    {"prompt": PROMPT, "response": GOOD, "reward": 1.0},                           # 1 ok
    {"prompt": PROMPT, "response": WRONG, "correct": False, "note": "x"},          # 2 ok
    "{not json",                                                                   # 3
    {"prompt": PROMPT, "reward": 1},                                               # 4
    {"prompt": "", "response": GOOD, "reward": 1},                                 # 5
    {"prompt": PROMPT, "response": GOOD, "reward": "high"},                        # 6
    {"prompt": PROMPT, "response": GOOD},                                          # 7
    "",                                                                            # 8 blank
    {"prompt": PROMPT, "response": "so 2", "reward": 0.5,                          # 9 ok
     "behaviour_logprobs": [-0.5, -0.25, -1.0], "prompt_id": 7, "dataset": "gsm8k"},
    {"prompt": PROMPT, "response": "so 2", "reward": 1,                            # 10
     "behaviour_logprobs": [-0.5, -0.25]},
    {"prompt": PROMPT, "response": "so 2", "reward": 1, "finish_reason": "eos"},   # 11
    [1, 2],                                                                        # 12
    {"prompt": PROMPT, "response": "so 2", "correct": True,                        # 13 ok
     "finish_reason": "length"},
    {"prompt": PROMPT, "response": "so 2", "reward": 1,                            # 14
     "behaviour_logprobs": [-0.5, 0.5, -1.0]},
]
MIXED_REJECTED = [
    (3, "", "is not valid JSON (Expecting property name enclosed in double quotes at "
            "column 2)"),
    (4, "response", "is missing"),
    (5, "prompt", "is empty"),
    (6, "reward", "is 'high', not a finite number"),
    (7, "reward", "is missing (give reward, a number, or correct, a bool)"),
    (10, "behaviour_logprobs", "has 2 entries for 3 response tokens (EOS included)"),
    (11, "finish_reason", "is 'eos', not one of 'stop', 'length'"),
    (12, "", "is a JSON list, not an object"),
    (14, "behaviour_logprobs", "entry 1 is 0.5 > 0 (log-probabilities are <= 0)"),
]


def test_mixed_jsonl_exact_counts_and_rejections(tmp_path, store, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    report = ingest_file(str(path), store, tokenizer, round=0, shard_rows=3,
                         reward_correct=2.0, reward_incorrect=-1.0)
    assert report.total == 13  # the blank line is not a record
    assert report.written == 4 and len(report.rejected) == 9
    assert rejected(report) == MIXED_REJECTED
    assert {e.unit for e in report.rejected} == {"line"}
    assert str(report.rejected[0]) == f"{path} line 3: is not valid JSON (Expecting property " \
        "name enclosed in double quotes at column 2)"
    assert report.ignored_fields == ["note"]
    assert [s.num_rows for s in report.shards] == [3, 1]
    assert store.shards() == report.shards

    rows = store.read_table().to_pylist()
    assert [(r["response"], r["reward"], r["correct"], r["finish_reason"], r["dataset"])
            for r in rows] == [
        (GOOD, 1.0, True, "stop", "mixed"),
        (WRONG, -1.0, False, "stop", "mixed"),   # correct only -> reward_incorrect
        ("so 2", 0.5, True, "stop", "gsm8k"),    # reward only -> correct = reward > 0
        ("so 2", 2.0, True, "length", "mixed"),  # correct only -> reward_correct
    ]
    assert rows[2]["prompt_id"] == "7"
    assert rows[2]["behaviour_logprobs"] == [-0.5, -0.25, -1.0]
    assert [r["behaviour_logprobs"] for r in rows[:2]] == [None, None]
    assert {r["round"] for r in rows} == {0} and {r["policy_version"] for r in rows} == {-1}
    assert all(r["ref_logprobs"] is None and r["step_ends"] is None for r in rows)
    # the same prompt in the same dataset shares a prompt_id; ids are 16 hex chars
    assert rows[0]["prompt_id"] == rows[1]["prompt_id"] == rows[3]["prompt_id"]
    assert all(len(r["traj_id"]) == 16 and int(r["traj_id"], 16) >= 0 for r in rows)
    assert len({r["traj_id"] for r in rows}) == 4


def test_strict_stops_at_first_bad_line_and_writes_nothing(tmp_path, store, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    with pytest.raises(IngestError) as info:
        ingest_file(str(path), store, tokenizer, strict=True, shard_rows=1)
    assert str(info.value).startswith(f"{path} line 3: is not valid JSON")
    assert "nothing was written" in str(info.value)
    assert (info.value.error.row, info.value.error.source) == (3, str(path))
    assert store.shards() == [] and not (tmp_path / "store").exists()

    # a bad line after many good ones (more than one shard's worth): still nothing written
    good = [{"prompt": PROMPT, "response": f"so {i % 10}", "reward": 1} for i in range(5)]
    path = write_jsonl(tmp_path / "late.jsonl", good + [{"prompt": PROMPT, "response": "x"}])
    with pytest.raises(IngestError, match=re.escape(f"{path} line 6: reward: is missing")):
        ingest_file(str(path), store, tokenizer, strict=True, shard_rows=2)
    assert store.shards() == [] and not (tmp_path / "store").exists()

    # the first bad line in file order, whatever stage finds it (tokenisation vs parsing)
    path = write_jsonl(tmp_path / "order.jsonl", [
        good[0], {"prompt": PROMPT, "response": "so 2", "reward": 1, "behaviour_logprobs": [-1.0]},
        "{not json"])
    with pytest.raises(IngestError, match=re.escape(f"{path} line 2 (traj_id=")):
        ingest_file(str(path), store, tokenizer, strict=True)

    # a clean file in strict mode is written whole
    path = write_jsonl(tmp_path / "clean.jsonl", good)
    report = ingest_file(str(path), store, tokenizer, strict=True, shard_rows=2)
    assert (report.total, report.written, report.rejected) == (5, 5, [])
    assert [s.num_rows for s in store.shards()] == [2, 2, 1]


def test_parquet_input_uses_zero_based_row_ids(tmp_path, store, tokenizer):
    records = [
        {"prompt": PROMPT, "response": GOOD, "reward": 1.0, "correct": None,
         "behaviour_logprobs": None},
        {"prompt": PROMPT, "response": None, "reward": 1.0, "correct": None,
         "behaviour_logprobs": None},
        {"prompt": PROMPT, "response": WRONG, "reward": None, "correct": False,
         "behaviour_logprobs": None},
        {"prompt": PROMPT, "response": "so 2", "reward": 0.0, "correct": None,
         "behaviour_logprobs": [-1.0]},
    ]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    report = ingest_file(str(path), store, tokenizer, round=2, dataset="ext")
    assert (report.total, report.written) == (4, 2)
    assert rejected(report) == [
        (1, "response", "is null"),
        (3, "behaviour_logprobs", "has 1 entries for 3 response tokens (EOS included)"),
    ]
    assert str(report.rejected[0]) == f"{path} row 1: response: is null"
    assert store.rounds() == [2]
    rows = store.read_table().to_pylist()
    assert [(r["response"], r["reward"], r["correct"], r["dataset"], r["round"])
            for r in rows] == [(GOOD, 1.0, True, "ext", 2), (WRONG, 0.0, False, "ext", 2)]


def test_reingest_is_idempotent(tmp_path, store, tokenizer):
    records = [{"prompt": PROMPT, "response": f"so the answer is {i}", "reward": i % 2}
               for i in range(6)]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    first = ingest_file(str(path), store, tokenizer, shard_rows=4)
    assert (first.total, first.written, first.rejected) == (6, 6, [])
    ids = store.traj_ids()

    again = ingest_file(str(path), store, tokenizer, shard_rows=4)
    assert (again.total, again.written, again.shards) == (6, 0, [])
    assert rejected(again) == [(line, "traj_id", DUPLICATE_REASON) for line in range(1, 7)]
    assert again.duplicates == 6
    assert {e.traj_id for e in again.rejected} == ids
    # strict mode treats rows already in the store as done, not as bad data
    strict = ingest_file(str(path), store, tokenizer, strict=True)
    assert (strict.written, strict.duplicates) == (0, 6)
    assert store.num_rows() == 6 and store.traj_ids() == ids

    # a partially ingested file (e.g. a crash after the first shard) is completed on re-run
    other = TrajectoryStore(tmp_path / "other")
    write_jsonl(tmp_path / "part.jsonl", records[:4])
    ingest_file(str(tmp_path / "part.jsonl"), other, tokenizer, dataset="data")
    rest = ingest_file(str(path), other, tokenizer)
    assert (rest.written, rest.duplicates) == (2, 4)
    assert other.traj_ids() == ids  # same ids as one clean run: (dataset, text, line) hash


def test_tokenisation_uses_chat_template_and_appends_eos(tmp_path, store, tokenizer):
    records = [{"prompt": PROMPT, "response": GOOD, "reward": 1},
               {"prompt": PROMPT, "response": WRONG, "reward": 0, "finish_reason": "length"}]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    ingest_file(str(path), store, tokenizer)
    stop, cut = store.read_table().to_pylist()

    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat == f"user: {PROMPT}\nassistant:"
    assert tokenizer.decode(stop["prompt_ids"]) == chat
    assert stop["prompt_ids"] == cut["prompt_ids"]
    assert tokenizer.unk_token_id not in stop["prompt_ids"] + stop["response_ids"]
    assert stop["response_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(stop["response_ids"][:-1]) == GOOD
    assert stop["response_ids"][:-1] == tokenizer(GOOD, add_special_tokens=False)["input_ids"]
    # cut at the length limit: no EOS was sampled, so none is added
    assert cut["response_ids"] == tokenizer(WRONG, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in cut["response_ids"]


def test_unreadable_or_unsupported_input(tmp_path, store, tokenizer):
    with pytest.raises(IngestError, match="unsupported input"):
        ingest_file(str(tmp_path / "data.csv"), store, tokenizer)
    with pytest.raises(IngestError, match="no such file"):
        ingest_file(str(tmp_path / "missing.jsonl"), store, tokenizer)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(IngestError, match=r"bad.parquet: cannot read after 0 records"):
        ingest_file(str(tmp_path / "bad.parquet"), store, tokenizer)


# ------------------------------------------------------------------------------- CLI

def run_cli(tmp_path, capsys, *args: str) -> tuple[int, str, str]:
    from jobs.ingest import main

    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  store: {tmp_path / 'store'}\n")
    code = main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_ingests_and_reports(tmp_path, capsys, tiny_checkpoint):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    code, out, _ = run_cli(tmp_path, capsys, "--input", str(path), "--round", "1",
                           "--tokenizer", str(tiny_checkpoint))
    assert code == 0
    assert f"{path}: 13 records, 4 written in 1 shard(s), 9 rejected (0 already in the " \
        "store)" in out
    assert f"rejected: {path} line 4: response: is missing" in out
    assert TrajectoryStore(tmp_path / "store").num_rows([1]) == 4

    code, out, err = run_cli(tmp_path, capsys, "--input", str(path), "--strict",
                             "--tokenizer", str(tiny_checkpoint))
    assert code == 2 and f"ingest failed: {path} line 3: is not valid JSON" in err


def test_cli_tiny_policy_needs_a_tokenizer(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", MIXED[:1])
    code, _, err = run_cli(tmp_path, capsys, "--input", str(path))
    assert code == 2 and "pass --tokenizer DIR or set model.tokenizer" in err
    assert not (tmp_path / "store").exists()
