"""Console sink: a compact line per logging step with the extreme layers, alerts highlighted."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import IO, Any

from gradwatch import schema
from gradwatch._format import fmt
from gradwatch.alerts import Alert
from gradwatch.distributed import is_rank_zero

_COLORS = {"info": "\033[36m", "warning": "\033[33m", "error": "\033[31;1m"}
_RESET = "\033[0m"


class Console:
    """Print metrics summaries and alerts (rank 0 only).

    Each logging step prints one line: the total norm, the clip coefficient when clipping, and
    the ``top`` layers with the smallest and the largest gradient norm (a model with at most
    ``2 * top`` layers lists each of its layers once, smallest first). Each alert prints once, as a
    highlighted block with its remedies; with a Console among the sinks the monitor raises no
    ``GradWatchWarning`` for alerts (``prints_alerts``), so the terminal shows every alert once.

    Args:
        metrics: print the per-step line (``False``: alerts only).
        top: how many extreme layers to show on each side.
        every: print metrics every this many logging steps' worth of steps (``None``: every one).
        stream: where to write (``sys.stderr`` by default).
        printer: a callable taking one string, used instead of ``stream`` (e.g. a progress bar's
            ``print``, so output does not tear the bar).
    """

    prints_alerts = True

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
        parts = [f"[gradwatch] step {step}", f"grad_norm {fmt(metrics.get(schema.GRAD_NORM_TOTAL, math.nan))}"]
        if schema.CLIP_COEF in metrics:
            parts.append(f"clip_coef {fmt(metrics[schema.CLIP_COEF])}")
        layers = sorted(schema.per_layer(metrics, schema.GRAD_NORM).items(), key=lambda kv: kv[1])
        if layers and self.top:
            if len(layers) <= 2 * self.top:  # both lists would share layers: list each layer once
                parts.append("layers, smallest first: " + ", ".join(f"{n} {fmt(v)}" for n, v in layers))
            else:
                parts.append("smallest: " + ", ".join(f"{n} {fmt(v)}" for n, v in layers[: self.top]))
                parts.append("largest: " + ", ".join(f"{n} {fmt(v)}" for n, v in layers[::-1][: self.top]))
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
