"""Problem sets as `Problem` records, from local files or a hub: `load_problems(task, source,
split)`, for any task of `dqo_ray.tasks.catalog.TASKS` (each task's record says how to parse a
record, where its hub data is and which file names a folder holds).

`source` is:
- a .jsonl / .json (JSON lines) or .parquet file;
- a folder holding `<split>.jsonl` (or `.parquet`), or the file names the task looks for
  (MATH500: `math500_<split>` first, then `<split>`, so `load_problems("math500", "data/math",
  "train")` gives the MATH train problems to draw few-shot exemplars from);
- otherwise a hub dataset name, via `datasets.load_dataset` (`None` = the task's default;
  `"owner/name:config"` picks a config). Never used by the tests;
- for a task that makes its own problems (tinymath): None or what its generator accepts.

A malformed record raises `DatasetFormatError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from dqo_ray.config import Config, ConfigError
from dqo_ray.tasks.catalog import get_task
from dqo_ray.tasks.task import DatasetFormatError, Problem

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
    task_def = get_task(task)
    if source is None:
        return task_def.hub(split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _find_in_folder(path, task_def.file_stems(split))
    if path.is_file():
        return path
    if _looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    name, _, config = source.partition(":")
    default_name, default_config = task_def.hub(split)
    return name, (config or (default_config if name == default_name else None))


def check_sources(cfg: Config, task: bool = True, evaluation: bool = True) -> None:
    """Raises ConfigError naming every local data source of the run (task.source,
    eval.sources of the evaluated datasets) that does not exist, before anything starts."""
    named = []
    if task and cfg.task.source is not None:
        named.append(("task.source", cfg.task.name, cfg.task.source, cfg.task.split))
    if evaluation:
        named += [(f"eval.sources.{name}", name, source, cfg.eval.split)
                  for name, source in cfg.eval.sources.items() if name in cfg.eval.datasets]
    problems = []
    for key, name, source, split in named:
        if not _looks_like_path(source) and not Path(source).expanduser().exists():
            continue  # a hub name (or tinymath's "seed=N"): nothing local to check
        try:
            resolve_source(name, source, split)
        except FileNotFoundError as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        raise ConfigError(problems)


def load_problems(task: str, source: str | None, split: str,
                  limit: int | None = None) -> list[Problem]:
    """The problems of `task` ("gsm8k", "math", "math500", "tinymath") from `source`, in file
    order (tinymath with source None or "seed=N": generated, see `tinymath.generate`).

    `limit` keeps the first `limit` problems. Raises DatasetFormatError (file and line in the
    message) on a malformed record, FileNotFoundError when a local source is missing.
    """
    task_def = get_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if task_def.generator is not None:
        generated = task_def.generator(source, split, limit)
        if generated is not None:
            return generated
    resolved = resolve_source(task, source, split)
    if isinstance(resolved, Path):
        records = _read_file(resolved)
    else:
        records = _read_hub(*resolved, split, limit)
    # islice stops before reading record limit+1, so a bad record past the limit is not seen.
    return [task_def.parse(record, split, index, where)
            for index, (record, where) in enumerate(islice(records, limit))]
