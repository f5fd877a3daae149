"""The case registry: each case is a small real training with the diagnosis it must produce."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradwatch.bench.expectations import check_categories

__all__ = ["CASES", "AlertRecord", "Case", "Trial", "all_cases", "get_case", "register"]

SOURCES = ("AUTOTRAINER", "DeepDiagnosis", "TrainCheck", "reference", "gradwatch")


@dataclass(frozen=True)
class AlertRecord:
    """The fields of one :class:`gradwatch.Alert` the benchmark scores (JSON-ready).

    Attributes:
        kind: the alert kind.
        step: the step at which the condition was established.
        layer: the layer named, or ``None``.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        remedy: the first remedy (``""`` when the alert has none).
    """

    kind: str
    step: int
    layer: str | None
    severity: str
    remedy: str

    @classmethod
    def from_alert(cls, alert: Any) -> AlertRecord:
        """From a :class:`gradwatch.Alert`."""
        return cls(alert.kind, int(alert.step), alert.layer, str(alert.severity),
                   alert.remedies[0] if alert.remedies else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        return {"kind": self.kind, "step": self.step, "layer": self.layer, "severity": self.severity,
                "remedy": self.remedy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlertRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(d["kind"], int(d["step"]), d["layer"], d["severity"], d["remedy"])


@dataclass(frozen=True)
class Trial:
    """One training run of a case and what gradwatch raised during it.

    Attributes:
        alerts: every alert, in the order emitted.
        steps: optimizer steps run.
        seed: the seed of this run.
        expect: the alert kind this run must raise, ``None`` for a healthy run. Set by cases scored
            across seeds, where an independent check of the trained network (an oracle) decides
            whether this seed's run is faulty; ``None`` with ``oracle=False`` defers to the case.
        oracle: whether ``expect`` was decided by the oracle of this run.
        note: what the oracle saw (shown in the table).
    """

    alerts: tuple[AlertRecord, ...]
    steps: int
    seed: int = 0
    expect: str | None = None
    oracle: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        return {"alerts": [a.to_dict() for a in self.alerts], "steps": self.steps, "seed": self.seed,
                "expect": self.expect, "oracle": self.oracle, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(AlertRecord.from_dict(a) for a in d["alerts"]), int(d["steps"]), int(d["seed"]),
                   d["expect"], bool(d["oracle"]), d["note"])


@dataclass(frozen=True)
class Case:
    """A faulty training program or a healthy control.

    Attributes:
        name: registry key (``gradwatch bench --only NAME``).
        source: where the case comes from: ``"AUTOTRAINER"`` (ICSE'21), ``"DeepDiagnosis"`` (ICSE'22),
            ``"TrainCheck"`` (OSDI'25), ``"reference"`` (gradwatch's reference scenarios) or ``"gradwatch"``.
        summary: one line: the program and its fault.
        run: trains and returns its :class:`Trial` (or one per seed for cases scored across seeds).
        expect: the alert kind the fault must raise first; ``None`` for a control (no alert at all).
        remedy: the accepted categories of the first remedy (see
            :mod:`gradwatch.bench.expectations`); empty for a control.
        scored_kinds: when set, only alerts of these kinds are scored (a case scored across seeds whose
            healthy seeds may legitimately raise other kinds).
        subprocess: run in a fresh interpreter (``python -m gradwatch.bench.worker NAME``); for cases that
            start processes of their own (a 2-process gloo job) or change global state.
        timeout_s: wall-clock limit of a subprocess case.
    """

    name: str
    source: str
    summary: str
    run: Callable[[], Trial | list[Trial]]
    expect: str | None = None
    remedy: tuple[str, ...] = ()
    scored_kinds: tuple[str, ...] | None = None
    subprocess: bool = False
    timeout_s: float = 120.0

    @property
    def control(self) -> bool:
        """A healthy control: it must raise nothing."""
        return self.expect is None


#: Every registered case, by name, in registration order (faulty programs, then controls).
CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    """Add ``case`` to :data:`CASES`.

    Raises:
        ValueError: a duplicate name, an unknown source or remedy category, a faulty case without an
            accepted remedy category, or a control with one.
    """
    if case.name in CASES:
        raise ValueError(f"case {case.name!r} is already registered")
    if case.source not in SOURCES:
        raise ValueError(f"case {case.name!r}: `source` must be one of {', '.join(SOURCES)}; got {case.source!r}")
    check_categories(case.remedy, case=case.name)
    if case.expect is not None and not case.remedy:
        raise ValueError(f"case {case.name!r}: a faulty case must name its accepted remedy categories")
    if case.expect is None and case.remedy:
        raise ValueError(f"case {case.name!r}: a control (expect=None) has no remedy categories")
    CASES[case.name] = case
    return case


def get_case(name: str) -> Case:
    """The registered case called ``name``.

    Raises:
        ValueError: unknown name (the message lists a few registered ones).
    """
    _load()
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; `gradwatch bench --list` shows the {len(CASES)} cases")
    return CASES[name]


def all_cases() -> dict[str, Case]:
    """Every case, registering the built-in ones on first use."""
    _load()
    return CASES


#: Modules whose import registers cases (faulty programs first, then controls). A case that needs its own
#: interpreter (a 2-process gloo job) registers ``Case(..., subprocess=True)`` from a module listed here.
CASE_MODULES: list[str] = ["gradwatch.bench.faulty", "gradwatch.bench.controls", "gradwatch.bench.distributed"]


def _load() -> None:
    import importlib

    for module in CASE_MODULES:
        importlib.import_module(module)  # registers its cases once (a module is imported once)
