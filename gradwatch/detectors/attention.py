"""Attention whose softmax is saturated: the gradient to its queries and keys vanishes.

A softmax whose scores are large (no ``1/sqrt(d)`` scale, q/k weights initialised large) puts all of a
query's attention on one key; its Jacobian, ``p_i (delta_ij - p_j)``, is then ~0 and the q/k projections
learn nothing, while their gradient norms need not look small (large keys multiply what little the
softmax passes). The gradients cannot tell this from a healthy attention, so the evidence is the
softmax itself: :class:`~gradwatch.evidence.AttentionProbe` forms the scores of each (q, k) pair of
sibling projections on logging steps (a lower bound on the real scores, see there). This detector runs
on the host at logging steps over those measurements.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_range
from gradwatch.detectors.base import Detector, DetectorContext, Finding, Series, StepEvidence

__all__ = ["AttentionSaturation"]

_STATE = ("streak",)


class AttentionSaturation(Detector):
    """``vanishing`` (source ``attention``): a q/k pair's softmax passes almost no gradient for ``persist``
    measurements.

    A measurement (one per logging step, for models with sibling ``nn.Linear`` q/k projections such as
    ``q``/``k`` or ``q_proj``/``k_proj``) is the trace of the softmax's Jacobian, ``1 - sum(p^2)``, over
    its value for a uniform attention, ``1 - 1/n``, averaged over the query rows, with the scores taken as
    ``q @ k.T / d`` (a lower bound on the real scores, :class:`~gradwatch.evidence.AttentionProbe`). It
    holds below ``threshold``. Default 0.1, the same tenth as for dead and saturated units: the scores
    then pass less than a tenth of the gradient a uniform attention passes. Measured (bench models,
    every 10th step of 100): unscaled attention with 32x q/k init 0.028-0.040 (0.004-0.008 at the
    1/sqrt(d) scale); the scaled model at PyTorch's init 0.999-1.000; unscaled at PyTorch's init 1.000.

    Args:
        threshold: threshold on the normalised Jacobian trace.
        persist: consecutive measurements (logging steps) the condition must hold.
    """

    def __init__(self, threshold: float = 0.1, persist: int = 3) -> None:
        super().__init__()
        self.threshold = check_range("threshold", threshold, 0.0, 1.0)
        self.persist = check_int("persist", persist, 1)
        self.streak = 0.0
        self.pairs: tuple[tuple[str, str], ...] = ()
        self.fracs, self.which = Series(), Series()

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self.fracs, self.which = Series(), Series()

    def update(self, ev: StepEvidence) -> None:
        sample = ev.attention
        if sample is None:
            return
        self.pairs = sample.pairs
        top = torch.nan_to_num(sample.passing, nan=1.0).min(0)
        self.fracs.add(top.values, ev.stats.step)
        self.which.add(top.indices, ev.stats.step)

    def readout(self) -> dict[str, Tensor]:
        fracs, which = self.fracs.readout(), self.which.readout()
        return {} if fracs is None or which is None else {"fracs": fracs, "which": which}

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        steps = self.fracs.steps()
        self.which.steps()
        out: list[Finding] = []
        for frac, which, s in zip(values.get("fracs", []), values.get("which", []), steps):
            held = math.isfinite(frac) and frac < self.threshold
            self.streak = self.streak + 1 if held else 0.0
            if self.streak != self.persist or out or not self.pairs:
                continue
            q, k = self.pairs[min(int(which), len(self.pairs) - 1)]
            out.append(
                Finding(
                    "vanishing",
                    "attention",
                    s,
                    q,
                    frac,
                    self.threshold,
                    "warning",
                    f"Vanishing gradients through attention at step {s}: the softmax of the scores of {q} and {k} "
                    f"passes {frac:.2g}x the gradient of a uniform attention (threshold {self.threshold:g}) even "
                    f"with the scores scaled by 1/d, for {self.persist} logging steps: it is saturated, so {q} "
                    f"and {k} barely learn.",
                    (q, k),
                    evidence=(("attention_passing", frac),),
                )
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        """The host streak as a float64 tensor (measurements not read yet are folded first: one host read)."""
        fracs, which = self.fracs.take(), self.which.take()
        if fracs:
            self.collect({"fracs": fracs, "which": which}, -1)
        return {k: torch.tensor(getattr(self, k), dtype=torch.float64) for k in _STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in _STATE:
            if k in state:
                setattr(self, k, float(state[k]))
