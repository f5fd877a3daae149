"""The emit station: findings become alerts with remedies, and reach each channel once.

Channels, decided once (issue "the first hour"):

* the **sinks** get every admitted alert (rank 0 only); a ``Console`` sink is the terminal;
* ``on_alert="warn"`` adds one :class:`~gradwatch.GradWatchWarning` **only when no sink prints
  alerts** (so the terminal shows one block with the defaults), pointing at the user's code;
* the ``gradwatch`` **logger** gets one record per admitted alert; gradwatch installs a
  ``NullHandler`` on it (the logging HOWTO's rule for libraries), so the record shows only where
  the user configured logging;
* ``on_alert="raise"`` raises after the sinks have the alert; a callable ``on_alert`` is called
  on every rank.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from gradwatch import schema
from gradwatch.alerts import Alert, AlertLog
from gradwatch.detectors import Finding
from gradwatch.distributed import is_rank_zero
from gradwatch.errors import GradWatchAlertError, warn_user

log = logging.getLogger("gradwatch")

_SKIPPED_NOTE = " The step was skipped: no weight or optimizer state changed."


def typical_norm(history: Iterable[dict[str, float]]) -> float | None:
    """Median of the finite, positive total norms in ``history`` (``None`` when there are none)."""
    vals = [h[schema.GRAD_NORM_TOTAL] for h in history if 0 < h.get(schema.GRAD_NORM_TOTAL, 0) < float("inf")]
    return statistics.median(vals) if vals else None


class AlertChannels:
    """Turns findings into alerts and delivers them (see the module docstring).

    Args:
        sinks: the monitor's ``SinkSet``.
        alert_log: de-duplication and reminders.
        on_alert: ``"warn"``, ``"raise"``, ``"ignore"`` or a callable taking the :class:`Alert`.
        remedies: ``(finding, typical_norm) -> tuple[str, ...]``, the ranked remedies of a finding.
        skip_note: whether a non-finite gradient step is skipped (its alert says so).
    """

    def __init__(
        self,
        sinks: Any,
        alert_log: AlertLog,
        on_alert: str | Callable[[Alert], Any],
        remedies: Callable[[Finding, float | None], tuple[str, ...]],
        skip_note: bool,
    ) -> None:
        self.sinks = sinks
        self.alert_log = alert_log
        self.on_alert = on_alert
        self.remedies = remedies
        self.skip_note = skip_note

    def to_alert(self, f: Finding, typical: float | None) -> Alert:
        """The :class:`Alert` of one finding, remedies attached."""
        alert = Alert(
            kind=f.kind,
            step=f.step,
            layer=f.layer,
            value=float(f.value),
            threshold=float(f.threshold),
            severity=f.severity,  # type: ignore[arg-type]
            message=f.message,
            remedies=self.remedies(f, typical),
        )
        if f.kind == schema.NONFINITE and f.source == "grad" and self.skip_note:
            alert = replace(alert, message=alert.message + _SKIPPED_NOTE)
        return alert

    def emit(self, findings: list[Finding], history: Iterable[dict[str, float]]) -> list[Alert]:
        """Admit, deliver and return the alerts of ``findings`` (in step order)."""
        emitted: list[Alert] = []
        # A median over the history (~0.3 ms at 1000 entries): only when there is an alert to word.
        typical = typical_norm(history) if findings else None
        rank_zero = is_rank_zero()
        for f in sorted(findings, key=lambda f: f.step):
            admitted = self.alert_log.admit(self.to_alert(f, typical))
            if admitted is None:
                continue
            emitted.append(admitted)
            if rank_zero:
                self.sinks.alert(admitted)
                if self.on_alert == "warn":
                    log.warning(admitted.message)
                    if not self.sinks.prints_alerts:
                        warn_user(admitted.message)
            if callable(self.on_alert):
                self.on_alert(admitted)
        return emitted

    def raise_if_asked(self, alerts: list[Alert]) -> None:
        """``on_alert="raise"``: raise :class:`GradWatchAlertError` for the first alert."""
        if self.on_alert == "raise" and alerts:
            raise GradWatchAlertError(alerts[0])
