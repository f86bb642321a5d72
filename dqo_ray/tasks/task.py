"""What a task is: the `Task` record every task module defines, and the `Problem` records its
data becomes. Nothing here knows a particular task; `dqo_ray.tasks.catalog` lists them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


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


RecordParser = Callable[[Mapping[str, Any], str, int, str], Problem]
"""(record, split, index in the file, where) -> Problem; raises DatasetFormatError naming
`where` (the file and line) for a malformed record."""

PLAIN_STOP = ("\nQuestion:",)
"""Where a base model continuing the plain "Question: ...\\nAnswer:" template has finished its
answer and starts writing the next exemplar."""


def _split_stem(split: str) -> tuple[str, ...]:
    return (split,)


@dataclass(frozen=True)
class Task:
    """Everything the library knows about one task. Each task module (gsm8k.py, math.py,
    tinymath.py) defines its record(s); `dqo_ray.tasks.catalog.TASKS` lists them, and loading,
    prompting, grading and majority voting all look the task up there."""

    name: str
    parse: RecordParser
    """A data-file (or hub) record -> Problem, gold answer extracted."""
    hub: Callable[[str], tuple[str, str | None]]
    """split -> (hub dataset, config) that source None loads; raises ValueError (saying what
    to use instead) for a task without hub data."""
    instruction: str
    """Starts every prompt: asks for the answer in the form `grade` looks for first."""
    render_solution: Callable[[Problem], str]
    """A problem's worked solution ending in that answer form: k-shot exemplars and the warm
    start's targets."""
    grade: Callable[[str, str], bool]
    """(response, gold answer) -> correct. Runs in the caller's thread (an actor, or one of
    its threads), so it must be quick and bounded; `dqo_ray.tasks.grading` turns a raise into
    False."""
    answer_key: Callable[[str], str | None]
    """response -> its final answer in a canonical form, None without one: majority voting
    counts keys, so two keys may only be equal for answers of equal value."""
    grade_batch: Callable[[Sequence[str], Sequence[str]], list[bool]] | None = None
    """A faster form of `grade` over (responses, golds), when batching saves work (MATH: the
    math_verify cases run in parallel)."""
    file_stems: Callable[[str], tuple[str, ...]] = _split_stem
    """split -> the file names (no suffix) looked for, in order, in a source folder."""
    generator: Callable[[str | None, str, int | None], list[Problem] | None] | None = None
    """(source, split, limit) -> the problems of a task that makes its own (tinymath's
    generator), or None when `source` names files to read instead."""
    plain_stop: tuple[str, ...] = PLAIN_STOP
    """Stop strings for sampling from a plain-template prompt (a chat template needs none:
    the end of the assistant turn is EOS)."""
    vocabulary: tuple[str, ...] = ()
    """Every word its prompts and solutions can hold, when the task fixes them (a tiny
    word-level tokenizer needs no more); empty = read them from the problems."""


def text_field(record: Mapping[str, Any], key: str, where: str) -> str:
    """record[key], which must be a string; DatasetFormatError naming `where` otherwise."""
    if key not in record or record[key] is None:
        raise DatasetFormatError(f"{where}: missing field {key!r} (fields: "
                                 f"{', '.join(sorted(map(str, record)))})")
    value = record[key]
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: field {key!r} must be a string, got "
                                 f"{type(value).__name__}")
    return value


def optional_text(record: Mapping[str, Any], key: str, where: str) -> str | None:
    """record[key] when present: a string or None (e.g. an optional worked solution)."""
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise DatasetFormatError(f"{where}: field {key!r} must be a string")
    return value
