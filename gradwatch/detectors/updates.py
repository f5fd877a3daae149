"""Updates too small to train: the learning rate, not the gradients, is what vanishes.

The gradients of a run whose learning rate is far too low look healthy; only the update does not:
:class:`~gradwatch.evidence.UpdateTracker` measures ``||dw|| / ||w||`` per layer once per logging
step. This detector takes the largest layer's ratio of each measurement and the loss of every step
(both recorded by reference, no device op on the step) and runs on the host at the logging step.
"""

from __future__ import annotations

import math
from itertools import filterfalse

from gradwatch._checks import check_int, check_range
from gradwatch.detectors._common import UpdateLossSeries, fmt
from gradwatch.detectors.base import Finding

__all__ = ["SmallUpdates"]

_ALPHA = 0.9  # the loss EMA (a ~10-step memory)
_IMPROVED = 0.99  # the loss improved when its EMA fell 1% below its first value
_STATE = ("count", "first", "ema", "best", "streak")


class SmallUpdates(UpdateLossSeries):
    """``vanishing`` (source ``update``): every layer's update is below ``max_update`` of its weights while
    the loss has not improved.

    A measurement counts when the largest per-layer ratio ``||dw|| / ||w||`` of the last logging step's
    update is below ``max_update`` (and above 0: a skipped step moves nothing) **and** the loss's EMA has
    never been 1% below the first loss. The alert fires after ``persist`` consecutive measurements
    (one per logging step). Without a loss (``step(loss=...)``) it stays silent: small updates alone
    are also what a converged run or a schedule decayed to zero shows.

    Default ``max_update=1e-5``: two orders of magnitude below the common healthy ~1e-3 per step; at
    1e-5 the weights need 1e4 steps to move by a tenth of their size. Measured: the 58 healthy
    trainings of ``gradwatch bench`` never fall below 2.3e-4 (an MLP trained to a loss of 1e-6 with
    Adam), Adam at lr 1e-7 sits at ~9e-7.

    Args:
        max_update: threshold on the largest layer's update-to-weight ratio.
        persist: consecutive measurements (logging steps) the condition must hold.
    """

    state_keys = _STATE

    def __init__(self, max_update: float = 1e-5, persist: int = 3) -> None:
        super().__init__()
        self.max_update = check_range("max_update", max_update, 0.0, 1.0)
        self.persist = check_int("persist", persist, 1)
        self.count = self.first = self.ema = self.best = self.streak = 0.0

    def largest(self, ratios: list[float]) -> float:
        """The largest per-layer ratio (NaN, no measurement, as 0; Inf kept; the ratios are norms: >= 0)."""
        return max(filterfalse(math.isnan, ratios), default=0.0)

    def fold_events(self, events: list[tuple[int, int, float]]) -> list[tuple[int, float]]:
        """Host recursion over the loss and the measurements (by step); the measurements that fire."""
        fired = []
        for s, is_update, v in events:
            if not is_update:
                if not math.isfinite(v):
                    continue
                self.ema = v if self.count == 0 else _ALPHA * self.ema + (1 - _ALPHA) * v
                self.first = v if self.count == 0 else self.first
                self.best = self.ema if self.count == 0 else min(self.best, self.ema)
                self.count += 1
                continue
            flat = self.count > 0 and self.first > 0 and self.best >= _IMPROVED * self.first
            held = flat and 0 < v < self.max_update
            self.streak = self.streak + 1 if held else 0.0
            if self.streak == self.persist:
                fired.append((s, v))
        return fired

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        fired = self.fired(values.get("losses", []), values.get("updates", []))
        return [
            Finding(
                "vanishing",
                "update",
                s,
                None,
                v,
                self.max_update,
                "warning",
                f"Updates too small to train at step {s}: the optimizer moved no layer by more than {fmt(v)} of "
                f"its weights (threshold {fmt(self.max_update)}) for {self.persist} logging steps in a row, and the "
                "loss has not improved by 1% since the first step.",
                evidence=(("max_update", v),),
            )
            for s, v in fired[:1]
        ]
