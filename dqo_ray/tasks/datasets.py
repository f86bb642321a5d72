"""Math problem sets as `Problem` records: GSM8K, MATH and MATH500, from local files or a hub,
and the synthetic tinymath (see `dqo_ray.tasks.tinymath`).

`load_problems(task, source, split)` reads, per `source`:
- a .jsonl / .json (JSON lines) or .parquet file;
- a folder holding `<split>.jsonl` (or `.parquet`); for math500 `math500_<split>.jsonl` is
  looked for first, and without it the folder's `<split>` file is read as MATH records, so
  `load_problems("math500", "data/math", "train")` gives the MATH train problems to draw
  few-shot exemplars from (MATH500 itself is a test set only);
- otherwise a hub dataset name, via `datasets.load_dataset` (`None` = the task's default;
  `"owner/name:config"` picks a config). Never used by the tests.

tinymath has no hub dataset: `None` (or `"seed=N"`) runs its built-in generator, whose splits
are "warm", "train" and "test"; a local file of {"question", "answer", "solution"} records is
read as above.

The gold final answer is extracted once here: GSM8K's `#### <answer>` (thousands commas
dropped), MATH's last `\\boxed{}`, MATH500's `answer` field. A malformed record raises
`DatasetFormatError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from dqo_ray.tasks.grading import extract_boxed, parse_number

TASKS = ("gsm8k", "math", "math500", "tinymath")


@dataclass
class Problem:
    """One problem with its gold final answer (already extracted) and worked solution."""

    problem_id: str
    """Stable id: "gsm8k/<split>/<index>", or MATH's `unique_id` ("test/algebra/1.json"),
    shared by a problem's MATH and MATH500 records."""
    dataset: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """`split`, plus MATH `level` and `type` / `subject` where the record has them."""


class DatasetFormatError(ValueError):
    """A record that cannot become a Problem; the message names the file and line."""


# --------------------------------------------------------------------------------------------
# Record -> Problem, per task
# --------------------------------------------------------------------------------------------

def _text(record: Mapping[str, Any], key: str, where: str) -> str:
    if key not in record or record[key] is None:
        raise DatasetFormatError(f"{where}: missing field {key!r} (fields: "
                                 f"{', '.join(sorted(map(str, record)))})")
    value = record[key]
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: field {key!r} must be a string, got "
                                 f"{type(value).__name__}")
    return value


def gsm8k_gold(solution: str) -> str | None:
    """The final answer after the last `####` of a GSM8K solution, commas dropped."""
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k(record: Mapping[str, Any], split: str, index: int, where: str) -> Problem:
    question = _text(record, "question", where)
    solution = _text(record, "answer", where)
    gold = gsm8k_gold(solution)
    if gold is None:
        raise DatasetFormatError(f"{where}: field 'answer' has no '#### <answer>' line")
    if parse_number(gold) is None:
        raise DatasetFormatError(f"{where}: the answer after '####' is not a number: {gold!r}")
    return Problem(f"gsm8k/{split}/{index}", "gsm8k", question, gold, solution,
                   {"split": split})


def _math_meta(record: Mapping[str, Any], split: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"split": split}
    for key in ("level", "type", "subject"):
        if record.get(key) is not None:
            meta[key] = record[key]
    return meta


def _math(record: Mapping[str, Any], split: str, index: int, where: str,
          dataset: str = "math") -> Problem:
    question = _text(record, "problem", where)
    solution = _text(record, "solution", where)
    gold = extract_boxed(solution)
    if gold is None:
        raise DatasetFormatError(f"{where}: field 'solution' has no complete \\boxed{{...}} "
                                 "answer")
    meta = _math_meta(record, split)
    if not gold:
        # Two MATH train solutions (number_theory 7115, 7117) box nothing: kept, so the
        # counts match the published split, but flagged; no answer ever grades correct
        # against an empty gold and select_exemplars skips them.
        meta["empty_answer"] = True
    problem_id = record.get("unique_id") or f"{dataset}/{split}/{index}"
    return Problem(str(problem_id), dataset, question, gold, solution, meta)


def _math500(record: Mapping[str, Any], split: str, index: int, where: str) -> Problem:
    if "answer" not in record:
        # A plain MATH record (the train split used for exemplars): extract as for MATH.
        return _math(record, split, index, where, dataset="math500")
    question = _text(record, "problem", where)
    gold = _text(record, "answer", where).strip()
    if not gold:
        raise DatasetFormatError(f"{where}: field 'answer' is empty")
    solution = record.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise DatasetFormatError(f"{where}: field 'solution' must be a string")
    problem_id = record.get("unique_id") or f"math500/{split}/{index}"
    return Problem(str(problem_id), "math500", question, gold, solution,
                   _math_meta(record, split))


def _tinymath(record: Mapping[str, Any], split: str, index: int, where: str) -> Problem:
    question = _text(record, "question", where)
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip().isdigit():
        raise DatasetFormatError(f"{where}: field 'answer' must be a non-negative integer, "
                                 f"got {answer!r}")
    answer = answer.strip()
    solution = record.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise DatasetFormatError(f"{where}: field 'solution' must be a string")
    meta: dict[str, Any] = {"split": split}
    if record.get("level") is not None:
        meta["level"] = record["level"]
    return Problem(f"tinymath/{split}/{index}", "tinymath", question, answer, solution, meta)


def _no_hub(split: str) -> tuple[str, str | None]:
    raise ValueError("tinymath has no hub dataset: use source None or 'seed=N' (the built-in "
                     "generator), or a local .jsonl/.parquet file or folder")


RecordParser = Callable[[Mapping[str, Any], str, int, str], Problem]


@dataclass(frozen=True)
class _TaskSpec:
    parse: RecordParser
    file_stems: Callable[[str], tuple[str, ...]]
    hub: Callable[[str], tuple[str, str | None]]
    """split -> (default hub dataset, config)."""


_MATH_HUB = ("DigitalLearningGmbH/MATH-lighteval", "default")
_SPECS: dict[str, _TaskSpec] = {
    "gsm8k": _TaskSpec(_gsm8k, lambda split: (split,), lambda split: ("openai/gsm8k", "main")),
    "math": _TaskSpec(_math, lambda split: (split,), lambda split: _MATH_HUB),
    "math500": _TaskSpec(
        _math500, lambda split: (f"math500_{split}", split),
        lambda split: ("HuggingFaceH4/MATH-500", None) if split == "test" else _MATH_HUB),
    "tinymath": _TaskSpec(_tinymath, lambda split: (split,), _no_hub),
}


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

_SUFFIXES = (".jsonl", ".json", ".parquet")


def _read_jsonl(path: Path) -> Iterator[tuple[Mapping[str, Any], str]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"{where}: invalid JSON ({exc.msg} at column "
                                         f"{exc.colno})") from None
            if not isinstance(record, dict):
                raise DatasetFormatError(f"{where}: expected a JSON object, got "
                                         f"{type(record).__name__}")
            yield record, where


def _read_parquet(path: Path) -> Iterator[tuple[Mapping[str, Any], str]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield record, f"{path}: row {row}"
            row += 1


def _read_file(path: Path) -> Iterator[tuple[Mapping[str, Any], str]]:
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path)
    else:
        raise ValueError(f"{path}: unsupported file type (use one of {', '.join(_SUFFIXES)})")


def _read_hub(name: str, config: str | None, split: str,
              limit: int | None) -> Iterator[tuple[Mapping[str, Any], str]]:
    import datasets

    ds = datasets.load_dataset(name, config, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    for row, record in enumerate(ds):
        yield record, f"{name}[{split}] row {row}"


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith(_SUFFIXES)


def _find_in_folder(folder: Path, stems: tuple[str, ...]) -> Path:
    tried = [folder / f"{stem}{suffix}" for stem in stems for suffix in _SUFFIXES]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{folder}: none of {', '.join(p.name for p in tried)} exists")


def resolve_source(task: str, source: str | None, split: str) -> Path | tuple[str, str | None]:
    """The local file `load_problems` reads, or the (hub name, config) it loads."""
    spec = _spec(task)
    if source is None:
        return spec.hub(split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _find_in_folder(path, spec.file_stems(split))
    if path.is_file():
        return path
    if _looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    name, _, config = source.partition(":")
    default_name, default_config = spec.hub(split)
    return name, (config or (default_config if name == default_name else None))


def _spec(task: str) -> _TaskSpec:
    try:
        return _SPECS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}") from None


def load_problems(task: str, source: str | None, split: str,
                  limit: int | None = None) -> list[Problem]:
    """The problems of `task` ("gsm8k", "math", "math500", "tinymath") from `source`, in file
    order (tinymath with source None or "seed=N": generated, see `tinymath.generate`).

    `limit` keeps the first `limit` problems. Raises DatasetFormatError (file and line in the
    message) on a malformed record, FileNotFoundError when a local source is missing.
    """
    spec = _spec(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if task == "tinymath":
        from dqo_ray.tasks import tinymath  # imported here: tinymath imports this module

        seed = tinymath.generator_seed(source)
        if seed is not None:
            return tinymath.generate(split, limit, seed=seed)
    resolved = resolve_source(task, source, split)
    if isinstance(resolved, Path):
        records = _read_file(resolved)
    else:
        records = _read_hub(*resolved, split, limit)
    # islice stops before reading record limit+1, so a bad record past the limit is not seen.
    return [spec.parse(record, split, index, where)
            for index, (record, where) in enumerate(islice(records, limit))]
