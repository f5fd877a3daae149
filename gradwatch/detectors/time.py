"""Vanishing gradients across *time* in recurrent modules (``track_time=True``)."""

from __future__ import annotations

import math

import torch

from gradwatch._checks import check_int, check_range
from gradwatch.detectors._common import fmt
from gradwatch.detectors.base import Detector, DetectorContext, Finding, Latch, StepEvidence

__all__ = ["TimeVanishing"]


class TimeVanishing(Detector):
    """Vanishing gradients across *time* in recurrent modules (needs ``track_time=True``).

    Reads the temporal profile (:mod:`gradwatch.temporal`): the ratio of the loss gradient's norm
    with respect to the recurrent module's input at the first time step to that at the last. Its
    logarithm is averaged over the profiled (logging) steps with an EMA (``alpha``), so one lucky
    batch neither raises nor hides the alert; after ``warmup`` profiles the alert fires when the
    average ratio is below ``min_ratio``.

    Default 1e-8, from float32: a recurrent layer's weight gradient is a sum over time steps, and
    a first-step contribution below float32's resolution (1.2e-7) of the last step's is rounded
    away, so nothing the sequence's start contains can move the weights. A vanilla tanh RNN at
    50-100 steps sits at 1e-10..1e-20 (0 when it underflows); an LSTM that learned a 50-step copy
    task stays near 1 (measured, see the reference scenario ``recurrence``). An LSTM that has not
    learned a long-memory task may legitimately sit below it too: the alert then says truthfully
    that its gradient does not reach the sequence's start.

    Args:
        min_ratio: threshold on the first/last time-step gradient ratio.
        alpha: EMA decay per profiled step for the log-ratio.
        warmup: profiled steps before the detector may fire.
    """

    def __init__(self, min_ratio: float = 1e-8, alpha: float = 0.7, warmup: int = 3) -> None:
        super().__init__()
        self.min_ratio = check_range("min_ratio", min_ratio, 0.0, 1.0)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.warmup = check_int("warmup", warmup, 1)
        self.names: list[str] = []

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self.names = list(ctx.time_layers)
        n = len(self.names)
        self.state.add_state("ema", lambda dev: torch.zeros(n, device=dev))  # of the log ratio
        self.state.add_state("count", lambda dev: torch.zeros(n, device=dev))
        self.state.add_state("decay", lambda dev: torch.zeros(n, device=dev), persistent=False)  # last log decay
        self.latch = Latch(self.state, "time", n, values=("value", "decay"))
        self.state.bind(ctx.device)

    def update(self, ev: StepEvidence) -> None:
        profile = ev.times
        if profile is None or not self.names:
            return
        st = self.state
        dev = st.ema.device
        seen = profile.seen.to(dev)
        x = profile.log_ratio.to(dev)
        a = torch.where(st.count > 0, torch.full_like(st.ema, self.alpha), torch.zeros_like(st.ema))
        st.ema = torch.where(seen, a * st.ema + (1 - a) * x, st.ema)
        st.decay = torch.where(seen, profile.log_decay.to(dev), st.decay)
        st.count = st.count + seen.to(st.count.dtype)
        cond = seen & (st.count >= self.warmup) & (st.ema < math.log(self.min_ratio))
        self.latch.update(cond, ev.step, value=st.ema.exp(), decay=st.decay.exp())

    def readout(self) -> dict[str, torch.Tensor]:
        return super().readout() if self.names else {}

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        if not values:
            return []
        out: list[Finding] = []
        for f in self.latch.fired(values):
            name, s, v, d = self.names[f.index], f.step, f.value, f.values["decay"]
            out.append(
                Finding(
                    "vanishing",
                    f"time:{name}",
                    s,
                    name,
                    v,
                    self.min_ratio,
                    "warning",
                    f"Vanishing gradients across time at step {s}: in {name} the first time step gets "
                    f"{fmt(v)}x the gradient of the last (threshold {fmt(self.min_ratio)}; each step back "
                    f"keeps {fmt(d)} of it), so the sequence's start cannot influence the weights.",
                    (name,),
                )
            )
        return out
