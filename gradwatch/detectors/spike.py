"""Sudden jumps of the total gradient norm against its own recent history.

A healthy total norm fluctuates to 2-3x its running mean, with log-norm z-scores up to ~4 within
the first 50 steps of an ordinary Adam run (measured on CPU, torch 2.13; see docs/DESIGN.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_positive, check_range
from gradwatch.detectors._common import fmt
from gradwatch.detectors.base import Detector, DetectorContext, Finding, Series, StepEvidence

__all__ = ["Spike"]

_TINY = 1e-30


class Spike(Detector):
    """A sudden jump of the total gradient norm against its own recent history.

    Keeps an EMA of the log total norm and of its variance. After ``warmup`` steps, a step is a
    spike when its log-norm is more than ``z_thresh`` standard deviations above the mean *and*
    the norm is more than ``min_factor`` times the running geometric mean. Defaults (6 sigma, 10x)
    sit well above healthy fluctuation (2-3x, z up to ~4 early in an Adam run) and match
    large-run practice (6 sigma, OLMo-core). Spikes do not enter the EMA at full size (the update
    is winsorised at 3 sigma), so one spike does not hide the next.

    The recursion is sequential and nonlinear (the winsorisation), so it cannot be vectorised
    over steps: the total norms of the steps between two reads travel to the host in the logging
    step's one transfer, and the recursion runs there, in float64 (microseconds; on the device it
    would cost a dozen kernel launches per step).

    Args:
        alpha: EMA decay per step (0.95 is a ~20-step memory).
        z_thresh: z-score threshold on the log-norm.
        min_factor: the norm must also exceed this multiple of its running geometric mean.
        warmup: steps before the detector may fire.
    """

    def __init__(self, alpha: float = 0.95, z_thresh: float = 6.0, min_factor: float = 10.0, warmup: int = 20) -> None:
        super().__init__()
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.z_thresh = check_positive("z_thresh", z_thresh)
        self.min_factor = check_positive("min_factor", min_factor)
        if self.min_factor <= 1:
            raise ValueError(f"`min_factor` must be > 1; got {min_factor!r}")
        self.warmup = check_int("warmup", warmup, 1)
        self.mean = self.var = self.count = 0.0  # of the log total norm (host floats)
        self._fired: tuple[int, float, float] | None = None  # (step, factor, typical) not yet reported
        self.norms = Series()

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self.norms = Series()

    def update(self, ev: StepEvidence) -> None:
        self.norms.add(ev.stats.total_norm, ev.stats.step)

    def readout(self) -> dict[str, Tensor]:
        norms = self.norms.readout()
        return {} if norms is None else {"norms": norms}

    def fold(self, norms: list[float], steps: list[int]) -> None:
        """Run the recursion over host norms (oldest first); latch the first spike not reported yet."""
        mean, var, count = self.mean, self.var, self.count
        for n, s in zip(norms, steps):
            if not (math.isfinite(n) and n > 0):
                continue  # a non-finite or zero norm leaves the statistics alone
            x = math.log(max(n, _TINY))
            # 0.1 in log units (10%) floors the spread so a very steady norm does not make noise a spike.
            std = math.sqrt(var + 0.01)
            excess = x - mean
            warm = count >= self.warmup
            if warm and excess > self.z_thresh * std and excess > math.log(self.min_factor) and self._fired is None:
                self._fired = (s, math.exp(excess), math.exp(mean))
            # Running mean: cumulative average during warm-up, EMA after; winsorised at 3 sigma.
            a = self.alpha if warm else count / (count + 1)
            xw = min(x, mean + 3 * std) if warm else x
            new_mean = a * mean + (1 - a) * xw
            var = max(a * var + (1 - a) * (xw - mean) * (xw - new_mean), 0.0)
            mean = new_mean
            count += 1
        self.mean, self.var, self.count = mean, var, count

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        self.fold(values.get("norms", []), self.norms.steps())
        if self._fired is None:
            return []
        s, v, typical = self._fired
        self._fired = None
        return [
            Finding(
                "spike",
                "total",
                s,
                None,
                v,
                self.min_factor,
                "warning",
                f"Gradient spike at step {s}: the total norm jumped to {fmt(v)}x its running mean "
                f"({fmt(v * typical)} vs {fmt(typical)}).",
                evidence=(("typical_norm", typical),),
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        """The statistics as float64 tensors. Steps not read yet are folded first (one host read:
        checkpoints are rare and copy to the host anyway)."""
        pending = self.norms.take()
        if pending:
            self.fold(pending, self.norms.steps())
        return {k: torch.tensor(getattr(self, k), dtype=torch.float64) for k in ("mean", "var", "count")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("mean", "var", "count"):
            if k in state:
                setattr(self, k, float(state[k]))
