"""The sink protocol and the fan-out that keeps one failing sink from stopping training."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from gradwatch.alerts import Alert
from gradwatch.distributed import is_rank_zero
from gradwatch.errors import GradWatchWarning

__all__ = ["FailureGuard", "Sink", "SinkSet", "is_rank_zero"]  # is_rank_zero: re-exported from distributed

log = logging.getLogger("gradwatch")


@runtime_checkable
class Sink(Protocol):
    """Where metrics and alerts go. Sinks know nothing of torch: they get floats and Alerts.

    Optionally a sink may also define ``log_meta(meta: dict)``, called once with the layer names
    and the configuration before the first metrics, and a class attribute ``prints_alerts = True``
    when it shows each alert in the terminal (as :class:`~gradwatch.sinks.Console` does): then the
    monitor raises no ``GradWatchWarning`` for the alert, so the terminal shows it once.
    """

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Receive the host values of one logging step."""

    def log_alert(self, alert: Alert) -> None:
        """Receive one alert (already de-duplicated)."""

    def close(self) -> None:
        """Flush and release resources; must be idempotent."""


class FailureGuard:
    """Calls that must never stop training: each target's first failure is warned about once.

    Args:
        label: how a target is named in the warning (``"sink "`` gives "sink JSONL.log_metrics").
        others: what keeps receiving (``"sinks"``, ``"loggers"``).
    """

    def __init__(self, label: str, others: str) -> None:
        self.label = label
        self.others = others
        self._warned: set[int] = set()

    def call(self, target: Any, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` on behalf of ``target``; warn once per target if it raises."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # a sink or logger must never stop training
            if id(target) not in self._warned:
                self._warned.add(id(target))
                msg = (
                    f"gradwatch: {self.label}{type(target).__name__}.{what} failed ({type(exc).__name__}: {exc}); "
                    f"the other {self.others} keep receiving."
                )
                log.warning(msg)
                warnings.warn(msg, GradWatchWarning, stacklevel=4)


class SinkSet:
    """Calls every sink, isolating failures: a failing sink is warned about once and skipped."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)
        self._guard = FailureGuard("sink ", "sinks")

    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        fn = getattr(sink, method, None)
        if fn is not None:
            self._guard.call(sink, method, fn, *args)

    @property
    def prints_alerts(self) -> bool:
        """Whether a sink shows alerts in the terminal (then no ``GradWatchWarning`` repeats them)."""
        return any(getattr(s, "prints_alerts", False) is True for s in self.sinks)

    def meta(self, meta: dict[str, Any]) -> None:
        """Send the run's meta record to sinks that accept one."""
        for s in self.sinks:
            self._call(s, "log_meta", meta)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        """Send one step's metrics."""
        for s in self.sinks:
            self._call(s, "log_metrics", metrics, step)

    def alert(self, alert: Alert) -> None:
        """Send one alert."""
        for s in self.sinks:
            self._call(s, "log_alert", alert)

    def close(self) -> None:
        """Close every sink."""
        for s in self.sinks:
            self._call(s, "close")
