"""Grading: gold sweeps over the real data sets, hard cases both ways, time limits, threads."""

import dataclasses
import threading
import time

import pytest
from conftest import repo_data

from dqo_ray.config import GradingConfig
from dqo_ray.tasks import (
    TASKS,
    configure_grading,
    extract_boxed,
    grade,
    grade_many,
    grader_pool,
    load_problems,
)


@pytest.fixture(scope="module")
def short_timeout():
    """A 1 s math_verify limit, restored afterwards, so timeout tests stay quick."""
    old = grader_pool.grading_settings()
    configure_grading(dataclasses.replace(old, timeout_s=1.0))
    yield 1.0
    configure_grading(old)


# --------------------------------------------------------------------------------------------
# Gold sweeps: every gold solution grades correct against its own extracted answer
# --------------------------------------------------------------------------------------------

def test_gold_sweep_gsm8k():
    folder = repo_data("gsm8k")
    problems = load_problems("gsm8k", str(folder), "train") + \
        load_problems("gsm8k", str(folder), "test")
    assert len(problems) == 7473 + 1319
    start = time.perf_counter()
    wrong = [p.problem_id for p in problems if not grade("gsm8k", p.solution, p.answer)]
    print(f"gsm8k gold sweep: {len(problems)} in {time.perf_counter() - start:.2f}s")
    assert wrong == []


def test_gold_sweep_math_test():
    problems = load_problems("math", str(repo_data("math")), "test")
    assert len(problems) == 5000
    start = time.perf_counter()
    verdicts = grade_many("math", [p.solution for p in problems], [p.answer for p in problems])
    print(f"math gold sweep: {len(problems)} in {time.perf_counter() - start:.2f}s")
    assert [p.problem_id for p, ok in zip(problems, verdicts, strict=True) if not ok] == []


def test_gold_sweep_math500_against_answer_field():
    problems = load_problems("math500", str(repo_data("math")), "test")
    assert len(problems) == 500
    verdicts = grade_many("math500", [p.solution for p in problems],
                          [p.answer for p in problems])
    assert [p.problem_id for p, ok in zip(problems, verdicts, strict=True) if not ok] == []


def test_math500_answers_verify_through_math_verify():
    """The string fast path settles the sweeps above; this sends all 500 MATH500 answers
    through math_verify itself (solution's box vs the `answer` field), so its parsing of every
    answer form in the set is checked too."""
    problems = load_problems("math500", str(repo_data("math")), "test")
    jobs = [(p.answer, extract_boxed(p.solution)) for p in problems]
    start = time.perf_counter()
    verdicts = grader_pool.verify_many(jobs)
    print(f"math500 math_verify sweep: {len(jobs)} in {time.perf_counter() - start:.2f}s")
    assert [p.problem_id for p, ok in zip(problems, verdicts, strict=True) if not ok] == []


@pytest.mark.slow
def test_math_test_answers_verify_through_math_verify():
    """All 5000 MATH test answers, each against itself, through math_verify (~10 s/core)."""
    problems = load_problems("math", str(repo_data("math")), "test")
    verdicts = grader_pool.verify_many([(p.answer, p.answer) for p in problems])
    assert [p.problem_id for p, ok in zip(problems, verdicts, strict=True) if not ok] == []


# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold", [
    ("3 + 15 = 18\nThe answer is 18.", "18"),
    ("Janet makes 9 * 2 = $18.\n#### 18", "18"),
    ("The answer is $1,080.", "1080"),
    ("The answer is 1,080", "1,080"),
    ("The answer is: 5,000 dollars", "5000"),
    ("The answer is 18 dollars.", "18"),
    ("The answer is $18.", "18"),
    ("The answer is 18.00", "18"),
    ("The answer is -5.", "-5"),
    ("She is down \u22125 points. The answer is \u22125", "-5"),
    ("The answer is 0.5", "0.5"),
    ("The answer is 1/2", "0.5"),
    ("So she earns \\boxed{18} dollars.", "18"),
    ("\\boxed{\\$1,080}", "1080"),
    ("The area is \\boxed{18 \\text{ cm}^2}", "18"),
    ("\\boxed{2 \\times 9 = 18}", "18"),
    ("Final answer: 42", "42"),
    ("First 3 apples, then 5 more, for 18 in all", "18"),  # last-number fallback
    ("The answer is 20. Wait, no. The answer is 18.", "18"),  # the last answer line counts
    ("The answer is 18. We started from 20 apples.", "18"),  # answer line beats last number
    ("#### 18\nThen 7 more were mentioned.", "18"),
    ("The answer is 0", "0"),
])
def test_gsm8k_correct(response, gold):
    assert grade("gsm8k", response, gold) is True


@pytest.mark.parametrize("response, gold", [
    ("The answer is 18.5", "18"),
    ("The answer is 17.", "18"),
    ("The answer is 180", "18"),
    ("The answer is -18", "18"),
    ("The answer is 1,8", "18"),  # not a thousands group: reads as 1
    ("The answer is 20. We started from 18 apples.", "18"),
    ("#### 20\nThe answer is 21", "20"),  # the fixed form outranks ####
    ("There were 10 - 5 left", "-5"),  # a minus between numbers is not a sign
    ("", "18"),
    ("no numbers at all", "18"),
    ("The answer is 18", "not a number"),
    ("The answer is 18", ""),
])
def test_gsm8k_incorrect(response, gold):
    assert grade("gsm8k", response, gold) is False


# --------------------------------------------------------------------------------------------
# MATH / MATH500
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold", [
    ("so $x = \\boxed{0.5}$.", "\\frac{1}{2}"),
    ("\\boxed{1/2}", "0.5"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{3}", "x=3"),
    ("\\boxed{[2, 5)}", "[2,5)"),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]"),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{C}", "\\text{(C)}"),
    ("\\boxed{(C)}", "\\text{(C)}"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{2\\sqrt 2}", "2\\sqrt{2}"),
    ("\\boxed{30}", "30^\\circ"),
    ("\\boxed{30^{\\circ}}", "30"),
    ("\\boxed{5}", "5\\text{ cm}"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),
    ("\\boxed{\\frac{25}{13}}", "1\\frac{12}{13}"),
    ("\\boxed{4210_7}", "4210_{7}"),
    ("hence $x^2+y^2 = \\boxed 9$.", "9"),
    ("Find $\\fbox{12}$ ... the answer is $\\fbox{144}$", "144"),
    ("first \\boxed{3}, then finally \\boxed{4}", "4"),
    ("\\boxed{4}", "\\boxed{4}"),  # a still-boxed gold is unwrapped
])
def test_math_correct(response, gold):
    assert grade("math", response, gold) is True
    assert grade("math500", response, gold) is True


@pytest.mark.parametrize("response, gold", [
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
    ("\\boxed{(2, 5)}", "[2,5)"),  # open vs half-open interval
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3]"),
    ("\\boxed{18.5}", "18"),
    ("\\boxed{-3}", "3"),
    ("\\boxed{D}", "\\text{(C)}"),
    ("\\boxed{\\sqrt{3}}", "3"),
    ("first \\boxed{4}, then finally \\boxed{3}", "4"),  # the last box is the answer
    ("The answer is 3.", "3"),  # no box: the asked-for form is missing
    ("so the answer is \\boxed{3", "3"),  # cut off inside the box
    ("\\boxed{}", "3"),
    ("", "3"),
    ("\\boxed{3}", ""),
    ("\\boxed{\\frac{{{}", "3"),
    ("\\boxed{\\left(\\right.", "(1,2)"),
])
def test_math_incorrect(response, gold):
    assert grade("math", response, gold) is False


def test_extract_boxed_balances_braces():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}.") == "x^{2}"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_boxed("\\boxed 17$.") == "17"
    assert extract_boxed("\\boxed{1") is None
    assert extract_boxed("\\boxedx") is None
    assert extract_boxed("no box") is None


@pytest.mark.parametrize("task", ["gsm8k", "math", "math500"])
@pytest.mark.parametrize("response", [
    "", " ", "\x00\x01\x02", "}}}{{{" * 1000, "\\boxed{" * 5000, "\\boxed{" + "{" * 5000,
    "9" * 100_000, "The answer is " + "9" * 10_000, "\\boxed{" + "1/" * 2000 + "1}",
    "\\boxed{\\frac{\\frac{\\frac}{}}{}}", "\\boxed{\\begin{pmatrix}}", "\u00e9\u4e2d\U0001f600",
    None, 17,
])
def test_garbage_never_raises(task, response, short_timeout):
    assert grade(task, response, "3") is False


def test_power_tower_times_out_without_hanging(short_timeout):
    start = time.perf_counter()
    assert grade("math", "\\boxed{9^{9^{9^{9}}}}", "1") is False
    assert time.perf_counter() - start < short_timeout + 3
    # The pool is still usable afterwards.
    assert grade("math", "\\boxed{0.5}", "\\frac{1}{2}") is True


def test_hung_worker_is_killed_and_replaced():
    """A call stuck past the hard limit (here: the worker's own alarm switched off, as for a
    call stuck in C code) gets its worker killed; the next call gets a fresh one."""
    pool = grader_pool.VerifyPool(workers=1, timeout_s=0.5)
    pool.soft_alarm = False
    try:
        start = time.perf_counter()
        assert pool.run([("1", "9^{9^{9^{9}}}")]) == [False]
        assert time.perf_counter() - start < 0.5 + 1.0 + 5
        assert pool._live == 0 and pool._idle == []
        assert pool.run([("\\frac{1}{2}", "0.5"), ("2", "3")]) == [True, False]
        assert pool._live == 1
    finally:
        pool.shutdown()


def test_grade_many_runs_slow_cases_in_parallel_and_matches_grade(short_timeout):
    responses = ["\\boxed{0.5}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac13}", "\\boxed{2}",
                 "nothing", "\\boxed{x=3}"]
    golds = ["\\frac{1}{2}", "1", "\\frac{1}{2}", "2", "2", "3"]
    assert grade_many("math", responses, golds) == [True, False, False, True, False, True]
    assert grade_many("gsm8k", ["The answer is 4", "5"], ["4", "4"]) == [True, False]
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        grade_many("math", ["a", "b"], ["c"])


def test_grading_inside_threads():
    cases = [("\\boxed{0.5}", "\\frac{1}{2}", True), ("\\boxed{(2,5)}", "[2,5)", False),
             ("\\boxed{x = 3}", "3", True), ("\\boxed{\\sqrt{8}}", "2\\sqrt2", True)] * 3
    results: dict[int, bool] = {}

    def work(i: int) -> None:
        response, gold, _ = cases[i]
        results[i] = grade("math", response, gold) and grade("gsm8k", "The answer is 7", "7")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {i: expected for i, (_, _, expected) in enumerate(cases)}


def test_pool_settings_come_from_the_config():
    """The pool's defaults are the config's, and configure_grading applies a config section
    (the generator and evaluator actors call it at start); bad values are refused."""
    old = grader_pool.grading_settings()
    assert GradingConfig() == GradingConfig(workers=2, timeout_s=5.0)
    try:
        configure_grading(GradingConfig(workers=1, timeout_s=2.5))
        assert grader_pool.grading_settings() == GradingConfig(workers=1, timeout_s=2.5)
        assert grade("math", "\\boxed{0.5}", "\\frac{1}{2}") is True
        with pytest.raises(ValueError, match="grading.timeout_s must be > 0"):
            configure_grading(GradingConfig(timeout_s=0.0))
        with pytest.raises(ValueError, match="grading.workers must be >= 1"):
            configure_grading(GradingConfig(workers=0))
    finally:
        configure_grading(old)
    assert grader_pool.grading_settings() == old


def test_unknown_task_and_a_raising_grader(monkeypatch):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        grade("nope", "1", "1")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        grade_many("nope", ["1"], ["1"])

    def flaky(response: str, gold: str) -> bool:
        if response == "boom":
            raise RuntimeError("grader bug")
        return response.strip() == gold

    toy = dataclasses.replace(TASKS["gsm8k"], name="toy-task", grade=flaky, grade_batch=None)
    monkeypatch.setitem(TASKS, "toy-task", toy)
    assert grade("toy-task", " 7 ", "7") is True
    assert grade("toy-task", "boom", "7") is False  # a raising grader grades False
    assert grade_many("toy-task", ["7", "8", "boom"], ["7", "7", "7"]) == [True, False, False]

    def broken_batch(responses, golds):
        raise RuntimeError("batch grader bug")

    monkeypatch.setitem(TASKS, "toy-task", dataclasses.replace(toy, grade_batch=broken_batch))
    # A raising batch grader falls back to grading one by one.
    assert grade_many("toy-task", ["7", "8", "boom"], ["7", "7", "7"]) == [True, False, False]
