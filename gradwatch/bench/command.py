"""``gradwatch bench``: the command-line front of the detection benchmark."""

from __future__ import annotations

import argparse
from typing import TextIO

__all__ = ["add_arguments", "run"]

DESCRIPTION = (
    "Run gradwatch's detection benchmark: faulty training programs (AUTOTRAINER, DeepDiagnosis, TrainCheck, "
    "the reference scenarios, common failures) and healthy controls, each a small real training with the "
    "default detectors. Prints one row per case and a summary (recall, false alarms on controls, median steps "
    "to the first correct alert, top-1 remedy accuracy). Exit status 1 when a case is wrong."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to its subparser."""
    p.add_argument("--json", metavar="PATH", help="also write the per-case results and the summary as JSON")
    p.add_argument("--only", nargs="+", action="extend", metavar="NAME",
                   help="run only these cases (repeatable); --list shows the names")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--no-progress", action="store_true", help="no per-case progress lines on stderr")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the benchmark as ``args`` ask; returns the exit status (0: every case right, 1: some wrong, 2: bad names)."""
    from gradwatch.bench.registry import all_cases
    from gradwatch.bench.report import format_table, summary_line, write_json
    from gradwatch.bench.runner import CaseResult, run_bench

    cases = all_cases()
    if args.list:
        for c in cases.values():
            role = "control" if c.control else f"{c.expect} / {'|'.join(c.remedy)}"
            out.write(f"{c.name:44s} {c.source:14s} {role:40s} {c.summary}\n")
        return 0
    names = list(dict.fromkeys(args.only or cases))
    unknown = [n for n in names if n not in cases]
    if unknown:
        err.write(f"gradwatch bench: error: unknown case(s) {', '.join(map(repr, unknown))} for --only; "
                  "`gradwatch bench --list` shows the names\n")
        return 2

    def progress(i: int, n: int, r: CaseResult) -> None:
        if not args.no_progress:
            err.write(f"[{i:>2}/{n}] {r.case.name:44s} {'ok' if r.ok else 'WRONG':5s} {r.seconds:5.1f}s\n")
            err.flush()

    result = run_bench([cases[n] for n in names], progress)
    out.write(format_table(result) + "\n\n" + summary_line(result) + "\n")
    if args.json:
        out.write(f"json: {write_json(result, args.json)}\n")
    if result.wrong:
        out.write(f"{len(result.wrong)} case(s) wrong: {', '.join(r.case.name for r in result.wrong)}\n")
        return 1
    return 0
