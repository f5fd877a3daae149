"""The benchmark's output: the per-case table, the summary line and the ``--json`` document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradwatch.bench.runner import BenchResult, CaseResult

__all__ = ["HEADER", "format_row", "format_table", "summary_line", "to_json", "write_json"]

HEADER = ("case", "expected", "got", "first alert", "top-1 remedy", "ok")


def format_row(r: CaseResult) -> tuple[str, str, str, str, str, str]:
    """The table row of one case."""
    c = r.case
    expected = "none" if c.control else f"{c.expect} / {'|'.join(c.remedy)}"
    first = "-" if r.first_step is None else f"step {r.first_step}"
    if c.control or r.remedy_ok is None:
        remedy = "-"
    else:
        what = r.remedy_category or ("no alert" if r.first_step is None and r.remedy_category is None else "none")
        if len(r.trials) > 1:
            what += f"; {r.remedy_runs[0]}/{r.remedy_runs[1]} runs"
        remedy = f"{'yes' if r.remedy_ok else 'no'} ({what})"
    return c.name, expected, r.got, first, remedy, "yes" if r.ok else "NO"


def format_table(result: BenchResult) -> str:
    """A fixed-width table, one row per case, in run order."""
    rows = [HEADER, *(format_row(r) for r in result.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def summary_line(result: BenchResult) -> str:
    """``recall 33/35 (94%), false alarms 0/25 controls, median steps to first correct alert 4, ...``."""
    m = result.median_first_step
    return (
        f"recall {result.detected}/{len(result.faulty)} ({_pct(result.recall)}), "
        f"false alarms {result.false_alarms}/{len(result.controls)} controls, "
        f"median steps to first correct alert {'-' if m is None else f'{m:g}'}, "
        f"top-1 remedy {result.remedy_right}/{result.remedy_scored} ({_pct(result.remedy_accuracy)}), "
        f"{result.seconds:.0f}s"
    )


def to_json(result: BenchResult) -> dict[str, Any]:
    """The ``--json`` document: ``{"version", "summary", "cases"}``."""
    from gradwatch import __version__

    return {
        "version": __version__,
        "summary": result.summary(),
        "cases": [r.to_dict() for r in result.results],
    }


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Write :func:`to_json` to ``path`` (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_json(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return p
