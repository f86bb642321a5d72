"""tinymath: synthetic multi-step arithmetic word problems small enough for a ~1M-parameter model.

A problem follows one person's count of one kind of object through 2-4 steps, and its
solution writes one equation per step, then a fixed answer line:

    Mia has 3 boxes of pears. Each box holds 4 pears. She gives 5 pears to Tom. She doubles
    her pears. How many pears does Mia have now?

    3 * 4 = 12.
    12 - 5 = 7.
    7 * 2 = 14.
    The answer is 14.

Choices, all made so that a tiny word/digit-level model can learn the task:

- Every number in the text, every operand and every intermediate result lies in
  1..MAX_VALUE = 40, added or removed amounts are single digits and factors 2..5 (and every
  number written in the question is >= 2, so plurals always read right): with one token per
  digit, question + solution stay within ~40-90 tokens, and the arithmetic is within reach of
  a ~1M-parameter model trained for minutes (with results up to 99 and amounts up to 30, 1000
  gold solutions x 25 epochs gave 12% held-out greedy accuracy; the model could not learn the
  sums).
- Each operation has several sentence templates (buys / finds / gets = +, gives away / loses /
  sells / eats = -, doubles / triples / "k times as many" = *, a start of "b boxes, each holds c"
  = *), and two of them share their verb but not their direction ("Tom gives her 3" adds,
  "she gives 3 to Tom" subtracts), so the model has to read the words, not the layout.
- The number of steps (= equations) is uniform over 2..4; `Problem.meta["level"]` holds it,
  so the evaluation's per-level breakdown reads as accuracy by step count.

Splits (`SPLITS`): "warm" (gold solutions for the supervised warm start), "train" (RL prompts)
and "test" (held-out evaluation). A problem's split is a function of a stable hash of its
question text (buckets of 10: 4 warm, 4 train, 2 test), so no question can ever be in two
splits, whatever the universe seed. A split's problems are the hash-filtered, de-duplicated
stream of a generator seeded by (universe seed, split): the first N are the same in every call
and every process, and a larger limit only extends the list.

Sources accepted by `load_problems("tinymath", source, split, limit)`: None (the built-in
generator, universe seed 0), "seed=N" (another universe; splits stay disjoint across
universes too, since the split depends on the text only), or a local .jsonl / .parquet file
(or folder with `<split>.jsonl`) of records {"question", "answer", optional "solution"}.

The task record `TINYMATH`: the prompt is the short TINYMATH_INSTRUCTION (every prompt token
costs a tiny model); grading takes the integer right after the last `The answer is` of the
response (exact case, as the solutions write it) and compares it with the gold integer, so a
response without one (none, a decimal, a last anchor without a number) grades False.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from string import Formatter
from typing import Any, TypeVar

from dqo_ray.tasks.answers import extract_boxed
from dqo_ray.tasks.gsm8k import numeric_answer_key
from dqo_ray.tasks.math import latex_answer_key
from dqo_ray.tasks.task import DatasetFormatError, Problem, Task, optional_text, text_field

_T = TypeVar("_T")

SPLITS = ("warm", "train", "test")
DEFAULT_SEED = 0
DEFAULT_SIZES = {"warm": 10_000, "train": 10_000, "test": 1_000}
"""Problems returned for `limit=None` (any limit may ask for more)."""
ANSWER_PREFIX = "The answer is"
TINYMATH_INSTRUCTION = "Solve step by step."
MAX_VALUE = 40
MIN_STEPS, MAX_STEPS = 2, 4

_BUCKETS = ("warm",) * 4 + ("train",) * 4 + ("test",) * 2
"""Hash bucket (0..9) -> split."""

# --------------------------------------------------------------------------------------------
# Vocabulary of the generator
# --------------------------------------------------------------------------------------------

_MALE = ("Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Noah", "Omar", "Ravi", "Finn")
_FEMALE = ("Mia", "Ana", "Eva", "Lily", "Zoe", "Emma", "Nora", "Sara", "Ivy", "Ruby")
_PRONOUNS = {False: {"He": "He", "he": "he", "him": "him", "his": "his"},
             True: {"He": "She", "he": "she", "him": "her", "his": "her"}}
_FOOD = ("apples", "pears", "lemons", "cookies", "eggs", "candies", "muffins", "plums")
_THINGS = ("marbles", "stickers", "pencils", "coins", "books", "shells", "cards", "stamps")
_FRIENDS = {name: tuple(n for n in _MALE + _FEMALE if n != name) for name in _MALE + _FEMALE}
_NOUNS = tuple((noun, True) for noun in _FOOD) + tuple((noun, False) for noun in _THINGS)
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"),
               ("pack", "packs"))

_START_PLAIN = "{name} has {a} {noun}."
_START_PRODUCT = "{name} has {a} {containers} of {noun}. Each {container} holds {b} {noun}."
_PRODUCT_START_P = 1 / 3
_QUESTIONS = ("How many {noun} does {name} have now?",
              "How many {noun} does {name} have in the end?")
_START_MAX = 20  # a plain start count is 2.._START_MAX
_FACTOR_MAX = 5  # container counts, per-container counts and "k times" factors are 2..5
_TERM_MAX = 9  # added and subtracted amounts are 2.._TERM_MAX


@dataclass(frozen=True)
class _Event:
    """One sentence that changes the count: `op` with `k` (fixed, or drawn when None)."""

    text: str
    op: str
    k: int | None = None
    food_only: bool = False


_EVENTS: dict[str, tuple[_Event, ...]] = {
    "+": (_Event("{He} buys {k} more {noun}.", "+"),
          _Event("{He} finds {k} more {noun}.", "+"),
          _Event("{He} gets {k} more {noun}.", "+"),
          _Event("{friend} gives {him} {k} {noun}.", "+")),
    "-": (_Event("{He} gives away {k} {noun}.", "-"),
          _Event("{He} loses {k} {noun}.", "-"),
          _Event("{He} sells {k} {noun}.", "-"),
          _Event("{He} gives {k} {noun} to {friend}.", "-"),
          _Event("{He} eats {k} {noun}.", "-", food_only=True)),
    "*": (_Event("{He} doubles {his} {noun}.", "*", k=2),
          _Event("{He} triples {his} {noun}.", "*", k=3),
          _Event("Then {he} has {k} times as many {noun}.", "*")),
}


def _words(text: str) -> list[str]:
    """The words of a template's literal text (its {fields} left out)."""
    literal = "".join(part for part, *_ in Formatter().parse(text))
    return re.findall(r"[A-Za-z]+", literal)


def _vocabulary() -> tuple[str, ...]:
    templates = [_START_PLAIN, _START_PRODUCT, *_QUESTIONS, TINYMATH_INSTRUCTION, ANSWER_PREFIX,
                 *(event.text for events in _EVENTS.values() for event in events)]
    words = [w for t in templates for w in _words(t)]
    words += [*_MALE, *_FEMALE, *_FOOD, *_THINGS]
    words += [w for forms in _PRONOUNS.values() for w in forms.values()]
    words += [w for pair in _CONTAINERS for w in pair]
    return tuple(sorted(set(words)))


TINYMATH_WORDS: tuple[str, ...] = _vocabulary()
"""Every word a tinymath prompt (instruction included) or solution can hold; digits and
punctuation are single tokens of the word tokenizer already."""


# --------------------------------------------------------------------------------------------
# One problem
# --------------------------------------------------------------------------------------------

def apply_operation(op: str, x: int, k: int) -> int:
    return x + k if op == "+" else x - k if op == "-" else x * k


@functools.cache
def _feasible_events(v: int, food: bool) -> tuple[tuple[_Event, ...], ...]:
    """Per feasible operation, the templates usable at count `v`: results stay in 1..MAX_VALUE (a
    subtraction leaves at least 1, so no count ever hits the degenerate 0)."""
    options = []
    if v <= MAX_VALUE - 2:
        options.append(_EVENTS["+"])
    if v >= 3:
        options.append(tuple(e for e in _EVENTS["-"] if food or not e.food_only))
    if v <= MAX_VALUE // 2:
        options.append(tuple(e for e in _EVENTS["*"] if e.k is None or v * e.k <= MAX_VALUE))
    return tuple(options)


# Draws go through rng.random() alone (a few times faster than choice / randint, and as
# deterministic): the generator is the cost of the rejection sampling done per split.
_Rand = Callable[[], float]


def _pick(rand: _Rand, seq: Sequence[_T]) -> _T:
    return seq[int(rand() * len(seq))]


def _between(rand: _Rand, lo: int, hi: int) -> int:
    return lo + int(rand() * (hi - lo + 1))


def _draw_k(rand: _Rand, event: _Event, v: int) -> int:
    if event.k is not None:
        return event.k
    if event.op == "+":
        return _between(rand, 2, min(_TERM_MAX, MAX_VALUE - v))
    if event.op == "-":
        return _between(rand, 2, min(_TERM_MAX, v - 1))
    return _between(rand, 2, min(_FACTOR_MAX, MAX_VALUE // v))


def draw_problem(rng: random.Random) -> tuple[str, str, int, int]:
    """One random problem: (question, solution, answer, steps). Any split; see `generate`."""
    rand = rng.random
    steps = _between(rand, MIN_STEPS, MAX_STEPS)
    female = rand() < 0.5
    name = _pick(rand, _FEMALE if female else _MALE)
    noun, food = _pick(rand, _NOUNS)
    fields = {"name": name, "friend": _pick(rand, _FRIENDS[name]), "noun": noun,
              **_PRONOUNS[female]}

    sentences: list[str] = []
    lines: list[str] = []
    if rand() < _PRODUCT_START_P:
        container, containers = _pick(rand, _CONTAINERS)
        a, b = _between(rand, 2, _FACTOR_MAX), _between(rand, 2, _FACTOR_MAX)
        v = a * b
        sentences.append(_START_PRODUCT.format(a=a, b=b, container=container,
                                               containers=containers, **fields))
        lines.append(f"{a} * {b} = {v}.")
        events = steps - 1
    else:
        v = _between(rand, 2, _START_MAX)
        sentences.append(_START_PLAIN.format(a=v, **fields))
        events = steps
    for _ in range(events):
        event = _pick(rand, _pick(rand, _feasible_events(v, food)))
        k = _draw_k(rand, event, v)
        new = apply_operation(event.op, v, k)
        sentences.append(event.text.format(k=k, **fields))
        lines.append(f"{v} {event.op} {k} = {new}.")
        v = new
    sentences.append(_pick(rand, _QUESTIONS).format(**fields))
    lines.append(f"{ANSWER_PREFIX} {v}.")
    return " ".join(sentences), "\n".join(lines), v, steps


EQUATION = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)\.$")  # one solution step


def split_of(question: str) -> str:
    """The split a question belongs to: a stable hash of its text (never Python's hash())."""
    digest = hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest()
    return _BUCKETS[int.from_bytes(digest, "big") % len(_BUCKETS)]


# --------------------------------------------------------------------------------------------
# Split streams
# --------------------------------------------------------------------------------------------

class _Stream:
    """The growing, de-duplicated list of one (seed, split)'s problems."""

    MAX_DRAWS_PER_PROBLEM = 1_000  # a guard against a universe too small for the ask

    def __init__(self, seed: int, split: str) -> None:
        self.split = split
        # A str seed goes through SHA-512: the same stream in every process.
        self.rng = random.Random(f"tinymath:{seed}:{split}")
        self.seen: set[str] = set()
        self.records: list[tuple[str, str, int, int]] = []
        self.lock = threading.Lock()

    def take(self, n: int) -> list[tuple[str, str, int, int]]:
        with self.lock:
            budget = self.MAX_DRAWS_PER_PROBLEM * max(0, n - len(self.records))
            while len(self.records) < n:
                if budget == 0:
                    raise RuntimeError(f"tinymath: cannot find {n} distinct {self.split!r} "
                                       "problems")
                budget -= 1
                record = draw_problem(self.rng)
                if record[0] in self.seen or split_of(record[0]) != self.split:
                    continue
                self.seen.add(record[0])
                self.records.append(record)
            return self.records[:n]


_STREAMS: dict[tuple[int, str], _Stream] = {}
_STREAMS_LOCK = threading.Lock()


def _stream(seed: int, split: str) -> _Stream:
    with _STREAMS_LOCK:
        key = (seed, split)
        if key not in _STREAMS:
            _STREAMS[key] = _Stream(seed, split)
        return _STREAMS[key]


def generator_seed(source: str | None) -> int | None:
    """The universe seed a `load_problems` source names: None -> DEFAULT_SEED, "seed=N" -> N;
    None for anything else (a file source)."""
    if source is None:
        return DEFAULT_SEED
    if source.startswith("seed="):
        try:
            return int(source[len("seed="):])
        except ValueError:
            raise ValueError(f"tinymath source {source!r}: expected 'seed=<integer>'") from None
    return None


def generate(split: str, limit: int | None = None, *, seed: int = DEFAULT_SEED) -> list[Problem]:
    """The first `limit` (default: DEFAULT_SIZES[split]) problems of a tinymath split.

    Ids are "tinymath/<split>/<index>"; meta holds `split` and `level` (the step count).
    Deterministic: the same list for the same (split, limit, seed) in every process. Results
    are cached per process, so asking again (or for more) costs only the new problems.
    """
    if split not in SPLITS:
        raise ValueError(f"tinymath has no split {split!r}; known: {', '.join(SPLITS)}")
    n = DEFAULT_SIZES[split] if limit is None else limit
    if n < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    return [Problem(f"tinymath/{split}/{i}", "tinymath", question, str(answer), solution,
                    {"split": split, "level": steps})
            for i, (question, solution, answer, steps) in enumerate(_stream(seed, split).take(n))]


def _generated(source: str | None, split: str, limit: int | None) -> list[Problem] | None:
    seed = generator_seed(source)
    return None if seed is None else generate(split, limit, seed=seed)


# --------------------------------------------------------------------------------------------
# The task: file records, prompt, grading, answer key
# --------------------------------------------------------------------------------------------

def parse_record(record: Mapping[str, Any], split: str, index: int, where: str) -> Problem:
    """A file record {"question", "answer" (a non-negative integer), optional "solution"}."""
    question = text_field(record, "question", where)
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip().isdigit():
        raise DatasetFormatError(f"{where}: field 'answer' must be a non-negative integer, "
                                 f"got {answer!r}")
    solution = optional_text(record, "solution", where)
    meta: dict[str, Any] = {"split": split}
    if record.get("level") is not None:
        meta["level"] = record["level"]
    return Problem(f"tinymath/{split}/{index}", "tinymath", question, answer.strip(), solution,
                   meta)


def _no_hub(split: str) -> tuple[str, str | None]:
    raise ValueError("tinymath has no hub dataset: use source None or 'seed=N' (the built-in "
                     "generator), or a local .jsonl/.parquet file or folder")


def render_solution(problem: Problem) -> str:
    # The generator's solution already ends in "The answer is N."; a file record may lack one.
    return problem.solution or f"{ANSWER_PREFIX} {problem.answer}."


_INTEGER = re.compile(r"\s*(-?\d{1,30})(?!\d|\.\d)")


def extract_tinymath_answer(response: str) -> int | None:
    """The integer right after the last "The answer is" of `response` (exact case, as the
    solutions write it), or None: no anchor, a decimal, or a last anchor without a number
    (an earlier anchor never stands in for it)."""
    if not isinstance(response, str):
        return None
    at = response.rfind(ANSWER_PREFIX)
    if at < 0:
        return None
    m = _INTEGER.match(response, at + len(ANSWER_PREFIX))
    return int(m.group(1)) if m else None


def _gold_int(gold: str) -> int | None:
    m = _INTEGER.fullmatch(str(gold).strip())
    return int(m.group(1)) if m else None


def grade(response: str, gold: str) -> bool:
    """The response's answer-line integer equals the gold integer."""
    expected = _gold_int(gold)
    return expected is not None and extract_tinymath_answer(response) == expected


ERROR_KINDS = ("no answer line", "arithmetic", "answer is not the last result", "wrong steps")


def error_kind(response: str, gold: str) -> str | None:
    """Why a response grades False, as one of ERROR_KINDS (None when it is correct): no
    readable answer line; a step whose result is wrong; an answer other than the last step's
    result; else every step is right but they are not this problem's steps."""
    if grade(response, gold):
        return None
    answer = extract_tinymath_answer(response)
    if answer is None:
        return ERROR_KINDS[0]
    steps = [m for m in map(EQUATION.match, response.split("\n")) if m]
    if any(apply_operation(op, int(a), int(k)) != int(v)
           for a, op, k, v in (m.groups() for m in steps)):
        return ERROR_KINDS[1]
    if steps and int(steps[-1][4]) != answer:
        return ERROR_KINDS[2]
    return ERROR_KINDS[3]


def grade_batch(responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """`grade` over a batch (no pool work: the per-call overhead is all it saves)."""
    return [grade(r, g) for r, g in zip(responses, golds, strict=True)]


def answer_key(response: str) -> str | None:
    """Majority votes count answers as the other tasks read them: a boxed answer as MATH's
    key, else the final number as GSM8K's."""
    if extract_boxed(response) is not None:
        return latex_answer_key(response)
    return numeric_answer_key(response)


TINYMATH = Task(
    name="tinymath",
    parse=parse_record,
    hub=_no_hub,
    instruction=TINYMATH_INSTRUCTION,
    render_solution=render_solution,
    grade=grade,
    grade_batch=grade_batch,
    answer_key=answer_key,
    generator=_generated,
    vocabulary=TINYMATH_WORDS,
)
