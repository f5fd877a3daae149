"""Gradients carried over across optimizer steps: a loop that does not zero them.

Without ``zero_grad`` the gradient the optimizer applies at step ``t`` is the sum of every gradient
since the last zeroing: ``G_t = G_(t-1) + g_t``. Projected on the previous applied gradient,
``G_t = beta * G_(t-1) + R`` has ``beta = 1 + <g_t, G_(t-1)> / |G_(t-1)|^2``: the previous gradient is
wholly contained in the new one (``beta`` ~ 1, above 1 as long as fresh gradients agree with the sum,
and the excess shrinks like ``1/t`` as the sum grows), and the norm grows. A loop that zeroes hands the
optimizer a fresh minibatch gradient, whose ``beta`` is the consecutive gradients' correlation (batch
noise keeps it well below 1).

A loop that zeroes with ``set_to_none=True`` (the default) hands new tensors every step, which
gradwatch sees on the host (:class:`~gradwatch.evidence.GradCarry`) without any device work: nothing
can be carried there. Only where a layer's tensors persist (``set_to_none=False``, no ``zero_grad``,
or a ``zero_grad`` that runs too rarely) a strided sample of the gradients is compared with last
step's, at the logging step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_range
from gradwatch.detectors.base import TINY, Detector, DetectorContext, Finding, Latch, StepEvidence
from gradwatch.evidence import GradSample

__all__ = ["Accumulating"]


class Accumulating(Detector):
    """``accumulating``: a layer's applied gradient is last step's plus a new one.

    Per layer, a comparison counts when the layer's gradient tensors are last step's objects and the
    coefficient ``beta`` of last step's sampled gradient in this one lies in ``[min_beta, max_beta]``
    while the norm grew. Steps whose tensors are new (zeroed with ``set_to_none=True``) neither count
    nor break the run, so a ``zero_grad`` that runs only every few steps accumulates evidence across
    its cycles. The alert fires after ``persist`` such comparisons without a failing one.

    Defaults: ``min_beta=0.95``: a carried sum has ``beta >= 1`` up to sampling noise (a few 1e-2 with
    256 entries per tensor), while consecutive minibatch gradients of a loop that zeroes have ``beta``
    near their correlation (batch noise keeps it well below 0.95). ``max_beta=1.5``: the excess of a
    carried sum is at most ``|g_t| / |G_(t-1)|`` (1 at the second step, shrinking like 1/t), while a
    zeroed run whose gradient is exploding keeps its growth rate. ``persist=5`` comparisons: one
    ordinary step that happens to pass is not a loop bug. Silent by construction for loops that zero
    with ``set_to_none=True`` every step, for real gradient accumulation (one ``step()`` per several
    backwards, zeroed after it) and for ``zero_grad(set_to_none=False)`` every step (the sum restarts).

    Args:
        min_beta: lower bound on the coefficient of last step's gradient in this step's.
        max_beta: upper bound on it.
        persist: comparisons that must pass without a failing one in between.
    """

    def __init__(self, min_beta: float = 0.95, max_beta: float = 1.5, persist: int = 5) -> None:
        super().__init__()
        self.min_beta = check_range("min_beta", min_beta, 0.0, 1.0)
        self.max_beta = check_range("max_beta", max_beta, 1.0, math.inf)
        self.persist = check_int("persist", persist, 2)
        self._prev: Tensor | None = None
        self._rows: list[tuple[int, GradSample | None]] = []
        self._idle = False

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        n = len(ctx.layers)
        self.state.add_state("streak", lambda dev: torch.zeros(n, device=dev))
        self.latch = Latch(self.state, "carried", n)
        self.state.bind(ctx.device)
        self._prev = None
        self._rows = []
        self._idle = False  # the last readout found the latch known free, and no fold latched since

    def update(self, ev: StepEvidence) -> None:
        if ev.carried is None and self._prev is None and not self._rows:
            return  # nothing carried now nor pending: nothing to fold (the common case)
        self._rows.append((ev.stats.step, ev.carried))
        if len(self._rows) >= 64:  # bound what is kept alive between two reads
            self.fold()

    def fold(self) -> None:
        """Compare each recorded sample with the previous step's (device only) and advance the streaks."""
        rows, self._rows = self._rows, []
        if not rows or self.ctx is None:
            return
        self._idle = False
        n = len(self.ctx.layers)
        st = self.state
        for step, sample in rows:
            prev, self._prev = self._prev, (sample.values if sample is not None else None)
            if sample is None or prev is None or prev.shape != sample.values.shape:
                continue  # new tensors (or no previous sample): neither evidence nor a break
            s = sample.values
            both = torch.stack([s * prev, s * s, prev * prev])
            dot, n2, p2 = torch.zeros(3, n, device=s.device).index_add_(1, sample.layer, both).unbind(0)
            beta = dot / p2.clamp_min(TINY)
            held = (beta >= self.min_beta) & (beta <= self.max_beta) & (n2 > p2) & torch.isfinite(n2)
            # Layers not carried this step keep their streak; carried ones count or break.
            streak = torch.where(sample.carried, (st.streak + 1) * held, st.streak)
            st.streak = streak
            step_t = torch.full((), float(step), device=s.device)
            self.latch.update(streak >= self.persist, step_t, value=beta)

    def readout(self) -> dict[str, Tensor]:
        if self._idle and not self._rows:  # nothing recorded nor latched since a readout found the latch free
            return {}
        self.fold()
        out = super().readout()
        self._idle = not out
        return out

    def state_dict(self) -> dict[str, Any]:
        self.fold()
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._idle = False  # the latch may hold entries
        super().load_state_dict(state)

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        if not values:  # the latch was known free: nothing to read
            return []
        assert self.ctx is not None
        hits = self.latch.fired(values)
        if not hits:
            return []
        names = self.ctx.names
        first = min(hits, key=lambda h: (h.step, h.index))
        layers = tuple(names[h.index] for h in sorted(hits, key=lambda h: h.index))
        more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
        return [
            Finding(
                "accumulating",
                "carried",
                first.step,
                names[first.index],
                first.value,
                self.min_beta,
                "warning",
                f"Gradients carried over across optimizer steps at step {first.step}: the gradient of "
                f"{names[first.index]}{more} is the previous step's plus a new one ({first.value:.2f}x the previous "
                f"gradient is contained in it, over {self.persist} comparisons): it is not zeroed between "
                "optimizer steps.",
                layers,
                evidence=(("beta", first.value), ("steps", float(self.persist))),
            )
        ]
