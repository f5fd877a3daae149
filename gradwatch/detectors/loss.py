"""The loss as evidence: a divergence is the loss rising while the gradients grow.

The loss never delays a gradient alert: the gradient detectors fire on their own evidence. This
detector adds the one failure that only the loss and the gradients *together* show early: updates
that make the model worse and its gradients larger, step after step (a learning rate past the
stable range). Its finding is an ``exploding`` alert (source ``divergence``); how the loss moved is
also what the remedies quote (:class:`~gradwatch.evidence.LossTrack`).

Each step's loss and total gradient norm are recorded by reference (no device op); they travel to
the host in the logging step's one transfer and the recursion (an EMA, a streak) runs there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_positive
from gradwatch.detectors._common import fmt
from gradwatch.detectors.base import Detector, DetectorContext, Finding, Series, StepEvidence

__all__ = ["LossDivergence"]

_ALPHA = 0.9  # the loss EMA's decay per step: a ~10-step memory, so one bad batch does not count
_STATE = ("count", "loss_sum", "log_grad_sum", "ema", "streak")


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
    have no ratio: the detector stays silent for them, and without a loss (``step(loss=...)``).

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
        self.count = self.loss_sum = self.log_grad_sum = self.ema = self.streak = 0.0
        self.losses, self.norms = Series(), Series()

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self.losses, self.norms = Series(), Series()

    def update(self, ev: StepEvidence) -> None:
        if ev.loss is not None:
            self.losses.add(ev.loss, ev.stats.step)
            self.norms.add(ev.stats.total_norm, ev.stats.step)

    def readout(self) -> dict[str, Tensor]:
        losses, norms = self.losses.readout(), self.norms.readout()
        return {} if losses is None or norms is None else {"losses": losses, "norms": norms}

    def fold(self, losses: list[float], norms: list[float], steps: list[int]) -> list[tuple[int, float, float]]:
        """Run the recursion over host values (oldest first); the steps at which the alert fires."""
        fired = []
        for loss, total, s in zip(losses, norms, steps):
            if not (math.isfinite(loss) and loss > 0 and math.isfinite(total) and total > 0):
                continue
            self.ema = loss if self.count == 0 else _ALPHA * self.ema + (1 - _ALPHA) * loss
            log_g = math.log(total)
            if self.count < self.warmup:
                self.loss_sum += loss
                self.log_grad_sum += log_g
                self.count += 1
                continue
            loss_ratio = self.ema / (self.loss_sum / self.count)
            grad_ratio = math.exp(log_g - self.log_grad_sum / self.count)
            held = loss_ratio > self.loss_rise and grad_ratio > self.grad_rise
            self.streak = self.streak + 1 if held else 0.0
            if self.streak == self.persist:
                fired.append((s, loss_ratio, grad_ratio))
        return fired

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        steps = self.losses.steps()
        self.norms.steps()
        fired = self.fold(values.get("losses", []), values.get("norms", []), steps)
        return [
            Finding(
                "exploding",
                "divergence",
                s,
                None,
                grad_ratio,
                self.grad_rise,
                "warning",
                f"Training diverges at step {s}: the loss is {fmt(loss_ratio)}x and the total gradient norm "
                f"{fmt(grad_ratio)}x their levels over the first {self.warmup} steps (thresholds "
                f"{fmt(self.loss_rise)}x and {fmt(self.grad_rise)}x), for {self.persist} steps.",
                evidence=(("loss_ratio", loss_ratio), ("grad_ratio", grad_ratio)),
            )
            for s, loss_ratio, grad_ratio in fired[:1]
        ]

    def state_dict(self) -> dict[str, Any]:
        """The host statistics as float64 tensors (steps not read yet are folded first: one host read)."""
        losses, norms = self.losses.take(), self.norms.take()
        if losses:
            self.fold(losses, norms, self.losses.steps())
            self.norms.steps()
        return {k: torch.tensor(getattr(self, k), dtype=torch.float64) for k in _STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in _STATE:
            if k in state:
                setattr(self, k, float(state[k]))
