"""Updates so large that training oscillates: the optimizer moves the weights a lot and the loss goes nowhere.

A learning rate too large for the gradient's noise (a batch of one sample at SGD lr 1.0) makes each step
overshoot: every update undoes part of the last, the loss swings around a level it never leaves, and
the gradient norm, being as noisy as the loss, shows no spike. What shows it is the update against the
loss: :class:`~gradwatch.evidence.UpdateTracker` measures ``||dw|| / ||w||`` per layer once per logging
step, and the loss of every step is recorded by reference (no device op); the recursion runs on the host
at logging steps.
"""

from __future__ import annotations

import math

from gradwatch._checks import check_int, check_range
from gradwatch.detectors._common import UpdateLossSeries, fmt
from gradwatch.detectors.base import Finding

__all__ = ["Oscillation"]

_ALPHA = 0.9  # the loss EMA (a ~10-step memory, as the evidence's LossTrack)
_IMPROVED = 0.99  # the loss improved when its EMA fell 1% below its best: above the batch noise of an EMA
_STATE = ("count", "ema", "best", "streak", "improved", "start", "done")
# The streak must also span this many optimizer steps: two memories of the loss EMA (alpha 0.9: ~10 steps),
# so "the loss went nowhere" is a sustained fact whatever log_every is (at log_every=1, three logging steps
# are three steps: the first steps of a small head on noise move it by 30% and the EMA cannot improve yet).
_MIN_SPAN = 20


class Oscillation(UpdateLossSeries):
    """``spike`` (source ``oscillation``): large updates that do not lower the loss, measurement after measurement.

    A measurement (the largest per-layer ``||dw|| / ||w||`` of a logging step's update) counts when it is at
    least ``min_update``; the alert fires when ``persist`` consecutive measurements count, spanning at
    least 20 optimizer steps (two memories of the loss EMA, whatever ``log_every`` is), **and** the loss's
    EMA did not improve by 1% over its best between the first of them and the last. Without a loss
    (``step(loss=...)``) it stays silent.

    Default ``min_update=0.1``: the common healthy heuristic is ~1e-3 per step; at 0.1 a tenth of the
    weights is replaced every step, 100x that, and a loss that does not fall meanwhile means the steps
    are undoing one another. Measured on ``gradwatch bench``: the 35 healthy trainings' largest update
    ratios at logging steps have medians 9e-4 - 8e-2 and never reach 0.1 on three logging steps in a row
    (at most 2 of 9); SGD lr 1.0 with batches of one sample: median 0.24, 76% of the logging steps at or
    above 0.1, the loss EMA never 1% below its best for 100+ steps.

    Args:
        min_update: threshold on the largest layer's update-to-weight ratio.
        persist: consecutive measurements (logging steps) the condition must hold.
    """

    state_keys = _STATE

    def __init__(self, min_update: float = 0.1, persist: int = 3) -> None:
        super().__init__()
        self.min_update = check_range("min_update", min_update, 0.0, math.inf)
        self.persist = check_int("persist", persist, 2)
        self.count = self.ema = self.best = self.streak = self.improved = self.start = self.done = 0.0

    def largest(self, ratios: list[float]) -> float:
        """The largest finite ratio: an infinite one (a weight at exactly 0) says nothing about overshoot (NaN and
        Inf as 0; the ratios are norms: >= 0)."""
        return max(filter(math.isfinite, ratios), default=0.0)

    def fold_events(self, events: list[tuple[int, int, float]]) -> list[tuple[int, float]]:
        """Host recursion over the loss and the measurements (by step); the measurements that fire."""
        fired = []
        for s, is_update, v in events:
            if not is_update:
                if not math.isfinite(v):
                    continue
                self.ema = v if self.count == 0 else _ALPHA * self.ema + (1 - _ALPHA) * v
                if self.count == 0 or self.ema < _IMPROVED * self.best:
                    self.best, self.improved = self.ema, 1.0
                self.count += 1
                continue
            if not (self.count > 0 and math.isfinite(v) and v >= self.min_update):
                self.streak = 0.0
                continue
            # A streak starts at a large update; it goes on only while the loss has not improved since.
            if self.streak > 0 and not self.improved:
                self.streak += 1
            else:
                self.streak, self.start, self.done = 1.0, float(s), 0.0
            self.improved = 0.0
            if self.streak >= self.persist and s - self.start >= _MIN_SPAN and not self.done:
                self.done = 1.0
                fired.append((s, v))
        return fired

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        fired = self.fired(values.get("losses", []), values.get("updates", []))
        return [
            Finding(
                "spike",
                "oscillation",
                s,
                None,
                v,
                self.min_update,
                "warning",
                f"Unstable training at step {s}: updates moved a layer by {fmt(v)} of its weights (threshold "
                f"{fmt(self.min_update)}) at {self.persist} logging steps in a row while the loss did not improve "
                "by 1%: the steps overshoot and undo one another, the loss oscillates.",
                evidence=(("max_update", v),),
            )
            for s, v in fired[:1]
        ]
