"""Evaluation metrics (pass@k, answer keys, majority voting, summaries) and the results file,
report and plot."""

import itertools
import json
import logging
import math
from fractions import Fraction

import pytest

from dqo_ray.evaluation import (
    PLOT_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    ProblemResult,
    answer_key,
    append_result,
    majority_correct,
    majority_vote,
    pass_at_k,
    read_results,
    result_row,
    summarize,
    write_report,
)

# --------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------


def _pass_at_k_brute(n: int, c: int, k: int) -> Fraction:
    """Exact: the fraction of k-subsets of n samples (the first c correct) with a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = float(_pass_at_k_brute(n, c, k))
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases_and_known_values():
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 8, 8) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c/n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs hold the correct one
    assert pass_at_k(10, 3, 8) == 1.0  # only 7 wrong: every 8-subset has a correct one
    # Large n stays finite and exact enough (the binomials would be ~1e299).
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    assert pass_at_k(1000, 500, 500) == pytest.approx(1 - math.comb(500, 500) / math.comb(1000, 500))
    for bad in ((4, 1, 0), (4, 1, 5), (4, 5, 2), (4, -1, 2)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# --------------------------------------------------------------------------------------------
# Answer keys and majority voting
# --------------------------------------------------------------------------------------------


def test_gsm8k_answer_keys_are_exact_numbers():
    assert answer_key("gsm8k", "So she pays 1,234 in total.\nThe answer is 1,234.") == "1234"
    assert answer_key("gsm8k", "Adding up: 1000 + 234 = 1234\n#### 1234") == "1234"
    assert answer_key("gsm8k", "The answer is $18.00.") == "18"
    assert answer_key("gsm8k", "The answer is 3.5.") == "7/2"
    assert answer_key("gsm8k", "The answer is -4.") == "-4"
    assert answer_key("gsm8k", "I do not know.") is None
    assert answer_key("gsm8k", "") is None
    assert answer_key("gsm8k", None) is None  # type: ignore[arg-type]


def test_math_answer_keys_normalise_latex_and_simple_numbers():
    half = ["\\boxed{\\dfrac{1}{2}}", "\\boxed{\\frac12}", "\\boxed{ \\frac{1}{2} }",
            "$\\boxed{1/2}$", "\\boxed{0.5}", "\\boxed{\\tfrac{1}{2}.}"]
    assert {answer_key("math", f"So x is {r}") for r in half} == {"1/2"}
    assert answer_key("math500", "\\boxed{-\\frac{6}{4}}") == "-3/2"
    assert answer_key("math", "\\boxed{18.00}") == "18"
    # Other answers are compared as normalised LaTeX strings: spacing and \left/\right go...
    assert answer_key("math", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "(3,\\frac{\\pi}{2})"
    assert answer_key("math", "\\boxed{x + 1}") == "x+1"
    # ...but algebraically equal forms stay apart (no sympy per sample).
    assert answer_key("math", "\\boxed{1 + x}") == "1+x"
    assert answer_key("math", "\\boxed{\\frac{1}{0}}") == "\\frac{1}{0}"  # not a number
    # The last box counts; no box, an empty box or a cut-off box is no answer.
    assert answer_key("math", "\\boxed{2} hmm, no: \\boxed{3}") == "3"
    assert answer_key("math", "The answer is 3.") is None
    assert answer_key("math", "\\boxed{}") is None
    assert answer_key("math", "\\boxed{\\frac{1}{") is None


def test_tinymath_keys_use_the_box_then_the_final_number():
    assert answer_key("tinymath", "it is \\boxed{\\frac{2}{4}}") == "1/2"
    assert answer_key("tinymath", "The answer is 7.") == "7"
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        answer_key("chess", "The answer is 7.")


def test_majority_vote_counts_equal_keys_and_breaks_ties_by_first_occurrence():
    gsm8k = ["The answer is 1,234.", "#### 1234", "The answer is 99.", "no idea", "#### 99"]
    keys = [answer_key("gsm8k", r) for r in gsm8k]
    assert keys == ["1234", "1234", "99", None, "99"]
    assert majority_vote(keys) == "1234"  # 2-2 tie: 1234 came first
    assert majority_vote(keys[2:] + keys[:2]) == "99"
    assert majority_vote([None, "5", None, "7", "7"]) == "7"  # None never wins
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None

    math_keys = [answer_key("math", r) for r in
                 ["\\boxed{\\dfrac{1}{2}}", "\\boxed{2}", "\\boxed{\\frac12}", "\\boxed{3}"]]
    assert majority_vote(math_keys) == "1/2"

    # majority_correct takes the verdict of a sample that gave the majority answer.
    assert majority_correct(keys, [True, True, False, False, False]) is True
    assert majority_correct(["9", "8", "8"], [True, False, False]) is False
    assert majority_correct([None, None], [False, False]) is None
    with pytest.raises(ValueError):
        majority_correct(["1"], [True, False])


# --------------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------------


def _math_results() -> list[ProblemResult]:
    return [
        ProblemResult("p1", "math", True, [True, True, False, False], ["1", "1", "2", "3"],
                      True, {"type": "Algebra", "level": "Level 1"}),
        ProblemResult("p2", "math", False, [False, False, False, False], ["4", "5", None, "4"],
                      False, {"type": "Algebra", "level": "Level 3"}),
        ProblemResult("p3", "math", True, [True, False, False, False], ["7", "8", "8", None],
                      False, {"subject": "Geometry", "level": 3}),  # MATH500's spelling
        ProblemResult("p4", "math", False, [False, True, False, False], [None, "6", None, "9"],
                      True, {"type": "Number Theory", "level": "Level 5"}),
    ]


def test_summarize_exact_numbers_and_breakdowns():
    s = summarize(_math_results(), k=4)
    assert s["n"] == 4
    assert s["greedy_acc"] == 0.5
    assert s["sample_acc"] == 4 / 16
    assert s["maj@4"] == 0.5
    # pass@4 from 4 samples: 1 when any is correct -> p1, p3, p4.
    assert s["pass@4"] == 0.75
    assert s["by_subject"] == {
        "Algebra": {"n": 2, "greedy_acc": 0.5},
        "Geometry": {"n": 1, "greedy_acc": 1.0},
        "Number Theory": {"n": 1, "greedy_acc": 0.0},
    }
    assert s["by_level"] == {
        "1": {"n": 1, "greedy_acc": 1.0},
        "3": {"n": 2, "greedy_acc": 0.5},
        "5": {"n": 1, "greedy_acc": 0.0},
    }
    assert list(s["by_level"]) == ["1", "3", "5"]


def test_summarize_pass_at_k_below_the_sample_count_and_k_inference():
    results = _math_results()
    s = summarize(results, k=2)
    # Unbiased pass@2 from n=4: p1 c=2 -> 1 - 1/6, p2 c=0 -> 0, p3 and p4 c=1 -> 1 - 3/6.
    assert s["pass@2"] == pytest.approx((5 / 6 + 0 + 1 / 2 + 1 / 2) / 4)
    assert s["maj@2"] == 0.5
    assert "pass@4" not in s
    assert set(summarize(results)) >= {"maj@4", "pass@4"}  # k defaults to the sample count
    with pytest.raises(ValueError, match="fewer than k=5"):
        summarize(results, k=5)


def test_summarize_greedy_only_and_without_meta():
    results = [ProblemResult("a", "gsm8k", True), ProblemResult("b", "gsm8k", False),
               ProblemResult("c", "gsm8k", True, majority_correct=None)]
    s = summarize(results, k=None)
    assert s == {"n": 3, "greedy_acc": pytest.approx(2 / 3), "sample_acc": None}
    assert summarize(results, k=1) == s  # one sample is no vote: no maj@1 / pass@1
    assert summarize([], k=None) == {"n": 0, "greedy_acc": None, "sample_acc": None}
    # A majority of None (no sample had an answer) counts as wrong.
    voted = [ProblemResult("a", "gsm8k", True, [False, False], [None, None], None),
             ProblemResult("b", "gsm8k", True, [True, True], ["1", "1"], True)]
    assert summarize(voted, k=2)["maj@2"] == 0.5
    with pytest.raises(ValueError):
        ProblemResult("x", "gsm8k", True, [True, False], ["1"])


# --------------------------------------------------------------------------------------------
# results.jsonl, report.md, accuracy.png
# --------------------------------------------------------------------------------------------


def _rows() -> list[dict]:
    math_s = summarize(_math_results(), k=4)
    rows = []
    # Out of order on purpose: the report sorts by round, then step.
    for ckpt, step, rnd, gsm, mth in [("round1-step20", 20, 1, 0.625, 0.35),
                                      ("base", 0, 0, 0.25, 0.10),
                                      ("round0-step10", 10, 0, 0.5, 0.35)]:
        rows.append(result_row(ckpt, "gsm8k", {"n": 8, "greedy_acc": gsm, "sample_acc": None},
                               step=step, round=rnd, eval_seconds=1.5, time=1.7e9 + step))
        rows.append(result_row(ckpt, "math", {**math_s, "greedy_acc": mth}, step=step,
                               round=rnd, eval_seconds=2.0, time=1.7e9 + step + 1))
    return rows


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_results_file_round_trip_and_truncated_last_line(tmp_path, caplog):
    rows = _rows()
    for row in rows:
        append_result(tmp_path, row)
    assert read_results(tmp_path) == rows
    assert read_results(tmp_path / "nothing-here") == []
    assert list(rows[0])[:6] == ["checkpoint", "step", "round", "dataset", "time", "eval_seconds"]

    # A writer killed mid-line leaves a fragment: readers skip it with a warning...
    with open(tmp_path / RESULTS_FILE, "a") as f:
        f.write('{"checkpoint": "round2-step30", "step": 30, "da')
    with caplog.at_level(logging.WARNING, logger="dqo_ray.evaluation.report"):
        assert read_results(tmp_path) == rows
    assert "the last line" in caplog.text

    # ...and the next append starts a fresh line, so the new row survives.
    extra = result_row("round2-step30", "gsm8k", {"n": 8, "greedy_acc": 0.75}, step=30,
                       round=2, eval_seconds=1.0, time=1.8e9)
    append_result(tmp_path, extra)
    assert read_results(tmp_path) == [*rows, extra]
    with pytest.raises(ValueError):
        append_result(tmp_path, {"dataset": "gsm8k"})


def test_write_report_table_stars_breakdowns_and_plot(tmp_path):
    from PIL import Image

    for row in _rows():
        append_result(tmp_path, row)
    report, plot = write_report(tmp_path)
    assert (report, plot) == (tmp_path / REPORT_FILE, tmp_path / PLOT_FILE)
    text = report.read_text()

    header = next(line for line in text.splitlines() if line.startswith("| checkpoint"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "checkpoint", "round", "step", "gsm8k", "math", "math sample", "math maj@4",
        "math pass@4"]
    table = _table_rows(text)
    assert list(table) == ["base", "round0-step10", "round1-step20"]  # round, then step
    assert table["base"] == ["0", "0", "25.0", "10.0", "25.0", "50.0", "75.0"]
    assert table["round0-step10"] == ["0", "10", "50.0", "**35.0** ★", "25.0", "50.0", "75.0"]
    # A tie for the best shares the star; a column of equal values has none.
    assert table["round1-step20"] == ["1", "20", "**62.5** ★", "**35.0** ★", "25.0", "50.0",
                                      "75.0"]
    assert text.count("★") == 3 + 1  # and once in the sentence explaining it

    # Breakdowns for the latest checkpoint, next to the first one.
    assert "### math by subject" in text and "### math by level" in text
    assert "| Algebra | 2 | 50.0 | 50.0 |" in text
    assert "| 3 | 2 | 50.0 | 50.0 |" in text
    assert "### gsm8k by" not in text
    assert "Problems per dataset: gsm8k 8, math 4." in text

    assert plot.stat().st_size > 1000
    with Image.open(plot) as image:
        image.verify()
    with Image.open(plot) as image:
        assert image.format == "PNG"
        assert image.size == (800, 450)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_report_with_one_checkpoint_given_rows_and_with_none(tmp_path):
    from PIL import Image

    row = result_row("only", "gsm8k", {"n": 3, "greedy_acc": 2 / 3, "sample_acc": 0.5},
                     step=5, eval_seconds=1.0, time=1.7e9)
    report, plot = write_report(tmp_path / "one", [row], title="One checkpoint")
    text = report.read_text()
    assert text.startswith("# One checkpoint\n")
    assert _table_rows(text) == {"only": ["5", "66.7", "50.0"]}  # no round column, no stars
    assert "★ " not in text.split("\n\n", 2)[2]
    with Image.open(plot) as image:
        assert image.size == (800, 450)

    # No step: the plot falls back to rounds, then to an index; no results at all still works.
    write_report(tmp_path / "rounds", [dict(row, step=None, round=3)])
    report, plot = write_report(tmp_path / "empty")
    assert "No evaluation results yet." in report.read_text()
    with Image.open(plot) as image:
        image.verify()
    json.dumps(row)  # rows are plain JSON
