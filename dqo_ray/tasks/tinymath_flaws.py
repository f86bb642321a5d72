"""Annotation flaws planted in tinymath's warm-start demonstrations (`pipeline.warm_start.
flip_subtractions`, `drop_answer_line`): each one a careless annotator's, stable per problem,
so that the warm start learns a choice that outcome rewards can correct."""

from __future__ import annotations

import hashlib

from dqo_ray.tasks.tinymath import ANSWER_PREFIX, EQUATION, apply_operation


def flip_subtractions(solution: str, rate: float, key: str) -> str:
    """`solution` as a careless annotator writes it: each subtraction step is written as an
    addition with probability `rate`, and the later steps and the answer follow from the wrong
    count. The choice is a stable function of (key, step), so one problem is flawed the same
    way in every process.

    Why: a warm start on these demonstrations learns to add or subtract at random where the
    question removes items. That is a choice the model can already make either way, so outcome
    rewards can correct it (the arithmetic errors of a 1M-parameter model are not; see the
    README's demo section). Solutions that are not tinymath's are returned unchanged.
    """
    if rate <= 0:
        return solution
    lines = solution.split("\n")
    out, value = [], None
    for step, line in enumerate(lines):
        match = EQUATION.match(line)
        if match is None:
            if line.startswith(ANSWER_PREFIX) and value is not None:
                line = f"{ANSWER_PREFIX} {value}."
            out.append(line)
            continue
        a, op, k = int(match[1]), match[2], int(match[3])
        a = a if value is None else value
        digest = hashlib.blake2b(f"{key}:{step}".encode(), digest_size=8).digest()
        if op == "-" and int.from_bytes(digest, "big") / 2**64 < rate:
            op = "+"
        value = apply_operation(op, a, k)
        out.append(f"{a} {op} {k} = {value}.")
    return "\n".join(out)


def drop_answer_line(solution: str, rate: float, key: str) -> str:
    """`solution` as a careless annotator writes it: with probability `rate` (a stable
    function of `key`) the final "The answer is N." line is left out, so the solution stops
    after its last step.

    Why: a warm start on these demonstrations ends about as often without the answer line as
    with it, a choice at one place the model can already make either way; the grader reads
    only the stated answer, so outcome rewards can correct it and more supervised training
    on the same set cannot. Solutions without a final answer line are returned unchanged.
    """
    lines = solution.split("\n")
    if rate <= 0 or len(lines) < 2 or not lines[-1].startswith(ANSWER_PREFIX):
        return solution
    digest = hashlib.blake2b(f"{key}:answer".encode(), digest_size=8).digest()
    return "\n".join(lines[:-1]) if int.from_bytes(digest, "big") / 2**64 < rate else solution
