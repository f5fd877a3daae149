"""The loss as evidence: a divergence is the loss rising while the gradients grow.

The loss never delays a gradient alert: the gradient detectors fire on their own evidence. This
detector adds the one failure that only the loss and the gradients *together* show early: updates
that make the model worse and its gradients larger, step after step (a learning rate past the
stable range, carried-over gradients). Its finding is an ``exploding`` alert (source
``divergence``); how the loss moved is also what the remedies quote
(:class:`~gradwatch.evidence.LossTrack`).
"""

from __future__ import annotations

import math

import torch

from gradwatch._checks import check_int, check_positive
from gradwatch.detectors._common import fmt
from gradwatch.detectors.base import TINY, Detector, DetectorContext, Finding, Persistence, StepEvidence

__all__ = ["LossDivergence"]


class LossDivergence(Detector):
    """Loss and gradient norm both far above their level over the first steps.

    The reference levels are the mean loss and the geometric-mean total gradient norm over the first
    ``warmup`` steps with a finite, positive loss. A step counts when the loss's EMA (alpha 0.9, a
    ~10-step memory: one bad batch does not count) exceeds ``loss_rise`` times its reference **and**
    the total gradient norm exceeds ``grad_rise`` times its reference; the alert fires after
    ``persist`` consecutive steps.

    Defaults: ``loss_rise=10``: a training loss an order of magnitude above where it started is worse
    than the untrained model by far (the loss of an untrained classifier is about ln(classes));
    healthy transients (a warm restart, the catapult phase of a large learning rate) stay within
    2-3x and fall back. ``grad_rise=10``: the same order of magnitude for the gradients, whose
    healthy drift stays within a few x. Losses that are not positive (log-likelihoods, GAN losses)
    have no ratio: the detector stays silent for them.

    Args:
        loss_rise: threshold on the loss EMA over its early level.
        grad_rise: threshold on the total gradient norm over its early level.
        warmup: steps that set the early levels.
        persist: consecutive steps the condition must hold.
    """

    def __init__(self, loss_rise: float = 10.0, grad_rise: float = 10.0, warmup: int = 10, persist: int = 3) -> None:
        super().__init__()
        self.loss_rise = check_positive("loss_rise", loss_rise)
        self.grad_rise = check_positive("grad_rise", grad_rise)
        if self.loss_rise <= 1 or self.grad_rise <= 1:
            raise ValueError(f"`loss_rise` and `grad_rise` must be > 1; got {loss_rise!r}, {grad_rise!r}")
        self.warmup = check_int("warmup", warmup, 1)
        self.persist = check_int("persist", persist, 1)

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        for name in ("count", "loss_sum", "log_grad_sum", "ema"):
            self.state.add_state(name, lambda dev: torch.zeros((), device=dev))
        self.diverging = Persistence(self.state, "diverging", 1, self.persist)
        self.state.add_state("loss_ratio", lambda dev: torch.zeros(1, device=dev), readout=True)
        self.state.bind(ctx.device)

    def update(self, ev: StepEvidence) -> None:
        if ev.loss is None:
            return
        st = self.state
        loss, total = ev.loss, ev.stats.total_norm
        usable = torch.isfinite(loss) & (loss > 0) & torch.isfinite(total) & (total > 0)
        learning = usable & (st.count < self.warmup)
        ready = st.count >= self.warmup
        ema = torch.where(st.count == 0, loss, 0.9 * st.ema + 0.1 * loss)
        st.ema = torch.where(usable, ema, st.ema)
        log_g = total.clamp_min(TINY).log()
        st.loss_sum = torch.where(learning, st.loss_sum + loss, st.loss_sum)
        st.log_grad_sum = torch.where(learning, st.log_grad_sum + log_g, st.log_grad_sum)
        st.count = st.count + learning.to(st.count.dtype)
        n = st.count.clamp_min(1)
        loss_ref = st.loss_sum / n
        grad_excess = log_g - st.log_grad_sum / n
        loss_ratio = st.ema / loss_ref.clamp_min(TINY)
        cond = usable & ready & (loss_ratio > self.loss_rise) & (grad_excess > math.log(self.grad_rise))
        fired = self.diverging.update(cond.reshape(1), grad_excess.exp().reshape(1), ev.step)
        st.loss_ratio = torch.where(fired, loss_ratio.reshape(1), st.loss_ratio)

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        out = []
        loss_ratio = values.get("loss_ratio", [math.nan])[0]
        for f in self.diverging.fired(values):
            out.append(
                Finding(
                    "exploding",
                    "divergence",
                    f.step,
                    None,
                    f.value,
                    self.grad_rise,
                    "warning",
                    f"Training diverges at step {f.step}: the loss is {fmt(loss_ratio)}x and the total gradient "
                    f"norm {fmt(f.value)}x their levels over the first {self.warmup} steps (thresholds "
                    f"{fmt(self.loss_rise)}x and {fmt(self.grad_rise)}x), for {self.persist} steps.",
                    evidence=(("loss_ratio", loss_ratio), ("grad_ratio", f.value)),
                )
            )
        return out
