"""Reading answers out of text, for more than one task: the last `\\boxed{}`, and numbers as
exact rationals. Pure and never raising on odd text (grading's contract)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (balanced braces), or None.

    Also accepts the brace-less `\\boxed 2` form found in a few MATH solutions. An unbalanced
    last box (a response cut off mid-answer) gives None rather than an earlier box, which
    would usually be an intermediate result.
    """
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # `\boxed 2$.`: one token, up to whitespace or the closing `$`.
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0).rstrip(".,;") if m else None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # an escaped brace `\{` does not count
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
        j += 1
    return None


# A number: optional sign (not a hyphen glued to a preceding word or number), optional `$`,
# digits with proper thousands groups or plain digits, optional decimals, optional `/denom`.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)\]}])[-\u2212])?(?:\\?\$\s?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?"
)


def _to_fraction(match: re.Match[str]) -> Fraction | None:
    try:
        value = Fraction(match.group("num").replace(",", ""))
        if match.group("den"):
            den = Fraction(match.group("den"))
            if den == 0:
                return None
            value /= den
    except (ValueError, ZeroDivisionError, OverflowError):
        return None  # e.g. a digit string longer than int's 4300-digit parse limit
    return -value if match.group("sign") else value


def _numbers(text: str) -> Iterator[Fraction]:
    """The numbers of `text` in order, as exact rationals (a match that does not parse, such
    as a zero denominator, is skipped)."""
    for m in _NUMBER.finditer(text):
        value = _to_fraction(m)
        if value is not None:
            yield value


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact rational ("1,080" -> 1080, "-$2.50" -> -5/2)."""
    return next(_numbers(text), None)


def last_number(text: str) -> Fraction | None:
    """The last number in `text`, as `parse_number` reads one."""
    values = list(_numbers(text))
    return values[-1] if values else None


def fraction_key(value: Fraction) -> str:
    """A rational as an answer key: "18", "-7/2" (one key per value)."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
