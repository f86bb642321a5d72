"""Checkpoint evaluation, pure logic: metrics (pass@k, majority voting, per-dataset
summaries) and the results file / report / plot they feed. The evaluator actor
(`actors/evaluator.py`) generates and grades; everything it computes from the verdicts is here.
"""

from dqo_ray.evaluation.metrics import (
    ProblemResult,
    answer_key,
    majority_correct,
    majority_vote,
    pass_at_k,
    summarize,
)
from dqo_ray.evaluation.report import (
    PLOT_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    append_result,
    read_results,
    result_row,
    write_report,
)

__all__ = [
    "PLOT_FILE", "REPORT_FILE", "RESULTS_FILE", "ProblemResult", "answer_key",
    "append_result", "majority_correct", "majority_vote", "pass_at_k", "read_results",
    "result_row", "summarize", "write_report",
]
