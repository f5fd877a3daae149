"""Run the cases and score them: detection (the expected kind, raised first), false alarms, remedies."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradwatch.bench.expectations import classify_remedy
from gradwatch.bench.registry import AlertRecord, Case, Trial

__all__ = ["RESULT_MARK", "BenchResult", "CaseResult", "judge", "run_bench", "run_case", "run_trials"]

#: The line prefix under which a subprocess case prints its trials (JSON) on stdout.
RESULT_MARK = "GRADWATCH_BENCH_RESULT "


@dataclass(frozen=True)
class CaseResult:
    """How gradwatch did on one case.

    Attributes:
        case: the case.
        trials: its runs (one, or one per seed).
        detected: faulty case: every faulty run raised the expected kind with no other (scored) kind
            before it, and every healthy seed raised nothing; control: ``None``.
        false_alarm: control: it raised an alert; faulty case: ``False``.
        first_step: the step of the first correct alert (first faulty run), or ``None``.
        remedy_category: category of the first remedy of that alert (``None``: no keyword, or no alert).
        remedy_ok: whether that category is one the case accepts (every faulty run); ``None`` for a
            control or a case none of whose seeds turned out faulty.
        seconds: wall-clock time.
        error: the exception, when the case's program itself failed.
        remedy_runs: ``(right, faulty)``: faulty runs whose first remedy is right, and faulty runs.
    """

    case: Case
    trials: tuple[Trial, ...]
    detected: bool | None
    false_alarm: bool
    first_step: int | None
    remedy_category: str | None
    remedy_ok: bool | None
    seconds: float
    error: str | None = None
    remedy_runs: tuple[int, int] = (0, 0)

    @property
    def ok(self) -> bool:
        """Right in every respect: detected with the right remedy, or a silent control."""
        if self.error is not None:
            return False
        if self.case.control:
            return not self.false_alarm
        return bool(self.detected) and self.remedy_ok is not False

    @property
    def got(self) -> str:
        """What gradwatch raised, for the table: ``"exploding@3, nonfinite@4"`` or per-seed counts."""
        if self.error is not None:
            return "error: " + self.error.strip().splitlines()[-1][:60]
        if len(self.trials) == 1:
            return _kinds(self.trials[0].alerts) or "none"
        kind = self.case.expect
        raised = sum(any(a.kind == kind for a in t.alerts) for t in self.trials)
        expects = [t.expect if t.oracle else kind for t in self.trials]
        faulty = sum(e is not None for e in expects)
        right = sum(_judge_trial(t, e, self.case.scored_kinds)[0] for t, e in zip(self.trials, expects))
        return f"{kind} on {raised}/{len(self.trials)} seeds (oracle: {faulty} died); {right}/{len(self.trials)} right"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the ``--json`` record of this case)."""
        c = self.case
        return {
            "name": c.name,
            "source": c.source,
            "summary": c.summary,
            "role": "control" if c.control else "faulty",
            "expect": c.expect,
            "remedy_accepted": list(c.remedy),
            "ok": self.ok,
            "detected": self.detected,
            "false_alarm": self.false_alarm,
            "first_step": self.first_step,
            "remedy_category": self.remedy_category,
            "remedy_ok": self.remedy_ok,
            "remedy_runs": list(self.remedy_runs),
            "got": self.got,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "trials": [t.to_dict() for t in self.trials],
        }


def _kinds(alerts: Sequence[AlertRecord]) -> str:
    first: dict[str, int] = {}
    for a in alerts:
        first[a.kind] = min(a.step, first.get(a.kind, a.step))
    return ", ".join(f"{k}@{s}" for k, s in sorted(first.items(), key=lambda kv: (kv[1], kv[0])))


def _judge_trial(trial: Trial, expect: str | None, scored: tuple[str, ...] | None) -> tuple[bool, AlertRecord | None]:
    alerts = [a for a in trial.alerts if scored is None or a.kind in scored]
    if expect is None:
        return not alerts, None
    hits = [a for a in alerts if a.kind == expect]
    if not hits:
        return False, None
    first = min(hits, key=lambda a: a.step)
    earlier = any(a.kind != expect and a.step < first.step for a in alerts)
    return not earlier, first


def judge(case: Case, trials: Sequence[Trial], seconds: float = 0.0, error: str | None = None) -> CaseResult:
    """Score ``trials`` of ``case``.

    A faulty run is detected when it raised the expected kind and no other kind at an earlier step
    (the first diagnosis is the right one; other kinds at the same step or later are allowed). Its
    remedy is the first remedy of the first alert of the expected kind, placed in a category by
    :func:`gradwatch.bench.expectations.classify_remedy`. A control must raise nothing at all.
    """
    trials = tuple(trials)
    if error is not None:
        return CaseResult(case, trials, None if case.control else False, False, None, None,
                          None if case.control else False, seconds, error)
    if case.control:
        return CaseResult(case, trials, None, any(t.alerts for t in trials), None, None, None, seconds)
    detected = True
    first_step: int | None = None
    category: str | None = None
    remedy_ok: bool | None = None
    right = faulty = 0
    for t in trials:
        expect = t.expect if t.oracle else case.expect
        ok, first = _judge_trial(t, expect, case.scored_kinds)
        detected &= ok
        if expect is None:
            continue
        this_category = classify_remedy(first.remedy) if first is not None else None
        this_ok = ok and this_category in case.remedy
        right += this_ok
        faulty += 1
        if remedy_ok is None:  # the first faulty run gives the figures shown
            first_step = first.step if ok and first is not None else None
            category = this_category
            remedy_ok = this_ok
        else:
            remedy_ok = remedy_ok and this_ok
    return CaseResult(case, trials, detected, False, first_step, category, remedy_ok, seconds, None, (right, faulty))


def run_trials(case: Case) -> list[Trial]:
    """Run ``case``'s program in this process (one intra-op thread, warnings silenced)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and fair when cores are shared
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = case.run()
    finally:
        torch.set_num_threads(threads)
    return list(out) if isinstance(out, list) else [out]


def _run_subprocess(case: Case) -> list[Trial]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch.bench.worker", case.name],
        capture_output=True, text=True, timeout=case.timeout_s, env=env,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return [Trial.from_dict(d) for d in json.loads(line[len(RESULT_MARK):])]
    raise RuntimeError(
        f"subprocess case {case.name!r} exited with status {proc.returncode} without a result:\n"
        + (proc.stderr.strip()[-2000:] or proc.stdout.strip()[-2000:])
    )


def run_case(case: Case) -> CaseResult:
    """Run and score one case (in a fresh interpreter when ``case.subprocess``)."""
    t0 = time.perf_counter()
    try:
        trials = _run_subprocess(case) if case.subprocess else run_trials(case)
    except Exception:  # the program under test failed: a wrong case, reported with its traceback
        return judge(case, (), time.perf_counter() - t0, traceback.format_exc())
    return judge(case, trials, time.perf_counter() - t0)


@dataclass(frozen=True)
class BenchResult:
    """The benchmark's figures over a set of cases.

    Attributes:
        results: per case, in run order.
        seconds: total wall-clock time.
    """

    results: tuple[CaseResult, ...]
    seconds: float = 0.0
    faulty: tuple[CaseResult, ...] = field(init=False)
    controls: tuple[CaseResult, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "faulty", tuple(r for r in self.results if not r.case.control))
        object.__setattr__(self, "controls", tuple(r for r in self.results if r.case.control))

    @property
    def detected(self) -> int:
        """Faulty cases detected (expected kind, raised first)."""
        return sum(bool(r.detected) for r in self.faulty)

    @property
    def recall(self) -> float | None:
        """Detected / faulty cases."""
        return self.detected / len(self.faulty) if self.faulty else None

    @property
    def false_alarms(self) -> int:
        """Controls that raised an alert (or failed to run)."""
        return sum(not r.ok for r in self.controls)

    @property
    def median_first_step(self) -> float | None:
        """Median step of the first correct alert over the detected faulty cases."""
        steps = [r.first_step for r in self.faulty if r.detected and r.first_step is not None]
        return statistics.median(steps) if steps else None

    @property
    def remedy_scored(self) -> int:
        """Faulty cases with a faulty run whose remedy can be scored."""
        return sum(r.remedy_ok is not None for r in self.faulty)

    @property
    def remedy_right(self) -> int:
        """Faulty cases whose first remedy is in an accepted category."""
        return sum(bool(r.remedy_ok) for r in self.faulty)

    @property
    def remedy_accuracy(self) -> float | None:
        """Top-1 remedy accuracy: right / scored (a missed case counts as a wrong remedy)."""
        return self.remedy_right / self.remedy_scored if self.remedy_scored else None

    @property
    def wrong(self) -> tuple[CaseResult, ...]:
        """Cases not right in every respect."""
        return tuple(r for r in self.results if not r.ok)

    def summary(self) -> dict[str, Any]:
        """The summary figures (JSON)."""
        return {
            "faulty": len(self.faulty),
            "controls": len(self.controls),
            "detected": self.detected,
            "recall": self.recall,
            "false_alarms": self.false_alarms,
            "median_steps_to_first_correct_alert": self.median_first_step,
            "remedy_right": self.remedy_right,
            "remedy_scored": self.remedy_scored,
            "top1_remedy_accuracy": self.remedy_accuracy,
            "wrong": [r.case.name for r in self.wrong],
            "seconds": round(self.seconds, 1),
        }


def run_bench(cases: Sequence[Case], progress: Callable[[int, int, CaseResult], None] | None = None) -> BenchResult:
    """Run ``cases`` one after the other and score them."""
    t0 = time.perf_counter()
    out = []
    for i, case in enumerate(cases):
        r = run_case(case)
        out.append(r)
        if progress is not None:
            progress(i + 1, len(cases), r)
    return BenchResult(tuple(out), time.perf_counter() - t0)
