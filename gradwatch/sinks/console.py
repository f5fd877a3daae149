"""Console sink: a compact line per logging step with the extreme layers, alerts highlighted."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO, Any

from gradwatch.alerts import Alert
from gradwatch.sinks.base import is_rank_zero

_COLORS = {"info": "\033[36m", "warning": "\033[33m", "error": "\033[31;1m"}
_RESET = "\033[0m"


def _fmt(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


class Console:
    """Print metrics summaries and alerts (rank 0 only).

    Each logging step prints one line: the total norm, the clip coefficient when clipping, and
    the ``top`` layers with the smallest and the largest gradient norm. Alerts print as a
    highlighted block with their remedies.

    Args:
        metrics: print the per-step line (``False``: alerts only).
        top: how many extreme layers to show on each side.
        every: print metrics every this many logging steps' worth of steps (``None``: every one).
        stream: where to write (``sys.stderr`` by default).
        printer: a callable taking one string, used instead of ``stream`` (e.g. a progress bar's
            ``print``, so output does not tear the bar).
    """

    def __init__(
        self,
        metrics: bool = True,
        top: int = 3,
        every: int | None = None,
        stream: IO[str] | None = None,
        printer: Callable[[str], Any] | None = None,
    ) -> None:
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            raise ValueError(f"`top` must be an integer >= 0; got {top!r}")
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"`every` must be None or an integer >= 1; got {every!r}")
        self.metrics = metrics
        self.top = top
        self.every = every
        self.stream = stream
        self.printer = printer
        self._last_printed: int | None = None

    def _out(self, text: str, color: str | None = None) -> None:
        if not is_rank_zero():
            return
        if self.printer is not None:
            self.printer(text)
            return
        stream = self.stream or sys.stderr
        if color and getattr(stream, "isatty", lambda: False)():
            text = f"{color}{text}{_RESET}"
        stream.write(text + "\n")
        stream.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Print the step's summary line."""
        if not self.metrics:
            return
        if self.every is not None and self._last_printed is not None and step - self._last_printed < self.every:
            return
        self._last_printed = step
        parts = [f"[gradwatch] step {step}", f"grad_norm {_fmt(metrics.get('grad_norm/total', float('nan')))}"]
        if "clip/coef" in metrics:
            parts.append(f"clip_coef {_fmt(metrics['clip/coef'])}")
        prefix = "grad_norm/"
        layers = sorted(
            ((k[len(prefix) :], v) for k, v in metrics.items() if k.startswith(prefix) and k != "grad_norm/total"),
            key=lambda kv: kv[1],
        )
        if layers and self.top:
            low = ", ".join(f"{n} {_fmt(v)}" for n, v in layers[: self.top])
            high = ", ".join(f"{n} {_fmt(v)}" for n, v in layers[::-1][: self.top])
            parts.append(f"smallest: {low}")
            parts.append(f"largest: {high}")
        self._out(" | ".join(parts))

    def log_alert(self, alert: Alert) -> None:
        """Print the alert and its remedies."""
        lines = [f"[gradwatch] {alert.severity.upper()} {alert.kind}: {alert.message}"]
        lines += [f"    {i}. {r}" for i, r in enumerate(alert.remedies, 1)]
        self._out("\n".join(lines), _COLORS.get(alert.severity))

    def close(self) -> None:
        """Nothing to release."""
        return None

    def __repr__(self) -> str:
        return f"Console(metrics={self.metrics}, top={self.top})"
