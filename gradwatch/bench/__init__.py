"""gradwatch's detection benchmark: faulty training programs and healthy controls, scored.

Each case is a small real training (data generated in code from a fixed seed) written against the
public API. A faulty case must raise its expected alert kind first, and the first remedy of that
alert must name the fix that removes the cause (:mod:`gradwatch.bench.expectations`); a control
must raise nothing. ``gradwatch bench`` runs them all; :func:`run_bench` does the same from Python.

Example::

    from gradwatch.bench import all_cases, run_bench, summary_line

    result = run_bench([all_cases()["traincheck_missing_zero_grad"]])
    print(summary_line(result))
"""

from gradwatch.bench.expectations import CATEGORIES, classify_remedy
from gradwatch.bench.registry import CASES, AlertRecord, Case, Trial, all_cases, get_case, register
from gradwatch.bench.report import format_table, summary_line, to_json, write_json
from gradwatch.bench.runner import BenchResult, CaseResult, judge, run_bench, run_case

__all__ = [
    "CASES",
    "CATEGORIES",
    "AlertRecord",
    "BenchResult",
    "Case",
    "CaseResult",
    "Trial",
    "all_cases",
    "classify_remedy",
    "format_table",
    "get_case",
    "judge",
    "register",
    "run_bench",
    "run_case",
    "summary_line",
    "to_json",
    "write_json",
]
