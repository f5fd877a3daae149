"""Sudden jumps of the total gradient norm against its own recent history.

A healthy total norm fluctuates to 2-3x its running mean, with log-norm z-scores up to ~4 within
the first 50 steps of an ordinary Adam run (measured on CPU, torch 2.13; see docs/DESIGN.md).
"""

from __future__ import annotations

import math

import torch

from gradwatch._checks import check_int, check_positive, check_range
from gradwatch.detectors._common import fmt
from gradwatch.detectors.base import TINY, Detector, DetectorContext, Finding, Latch, StepEvidence

__all__ = ["Spike"]


class Spike(Detector):
    """A sudden jump of the total gradient norm against its own recent history.

    Keeps an EMA of the log total norm and of its variance on the device. After ``warmup``
    steps, a step is a spike when its log-norm is more than ``z_thresh`` standard deviations
    above the mean *and* the norm is more than ``min_factor`` times the running geometric mean.
    Defaults (6 sigma, 10x) sit well above healthy fluctuation (2-3x, z up to ~4 early in an Adam
    run) and match large-run practice (6 sigma, OLMo-core). Spikes do not enter the EMA at full
    size (the update is winsorised at 3 sigma), so one spike does not hide the next.

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

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        for name in ("mean", "var", "count"):  # of the log total norm
            self.state.add_state(name, lambda dev: torch.zeros((), device=dev))
        self.latch = Latch(self.state, "spike", 1)
        self.state.bind(ctx.device)
        self._alpha = torch.tensor(self.alpha, device=ctx.device)

    def update(self, ev: StepEvidence) -> None:
        st = self.state
        mean, var, count = st.mean, st.var, st.count
        n = ev.stats.total_norm
        usable = torch.isfinite(n) & (n > 0)
        x = n.clamp_min(TINY).log()
        # 0.1 in log units (10%) floors the spread so a very steady norm does not make noise a spike.
        std = (var + 0.01).sqrt()
        excess = x - mean
        warm = count >= self.warmup
        spike = usable & warm & (excess > self.z_thresh * std) & (excess > math.log(self.min_factor))
        self.latch.update(spike, ev.step, value=excess.exp().reshape(1))
        # Running mean: cumulative average during warm-up, EMA after; winsorised at 3 sigma.
        a = torch.where(warm, self._alpha, count / (count + 1))
        xw = torch.where(warm, torch.minimum(x, mean + 3 * std), x)
        new_mean = a * mean + (1 - a) * xw
        new_var = a * var + (1 - a) * (xw - mean) * (xw - new_mean)
        st.mean = torch.where(usable, new_mean, mean)
        st.var = torch.where(usable, new_var.clamp_min(0), var)
        st.count = count + usable.to(count.dtype)

    def readout(self) -> dict[str, torch.Tensor]:
        return {**super().readout(), "typical": self.state.mean.exp().reshape(1)}

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        out = []
        for f in self.latch.fired(values):
            typical = values["typical"][0]
            out.append(
                Finding(
                    "spike",
                    "total",
                    f.step,
                    None,
                    f.value,
                    self.min_factor,
                    "warning",
                    f"Gradient spike at step {f.step}: the total norm jumped to {fmt(f.value)}x its running mean "
                    f"({fmt(f.value * typical)} vs {fmt(typical)}).",
                    evidence=(("typical_norm", typical),),
                )
            )
        return out
