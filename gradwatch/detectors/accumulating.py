"""Gradients carried over across optimizer steps: a loop that never calls ``zero_grad``.

Without ``zero_grad`` the gradient the optimizer applies at step ``t`` is the sum of every
gradient since training started: ``G_t = G_(t-1) + g_t``. Two consequences are measurable:

* consecutive applied gradients are nearly parallel: ``cos(G_t, G_(t-1)) = (|G|^2 + <g, G>) /
  (|G_t| |G|)`` tends to 1 as the sum grows (0.92 already at the fourth step for fresh gradients
  whose pairwise cosine is only 0.2);
* their norm grows step after step, like ``t`` while the fresh gradients agree and like ``sqrt(t)``
  when they do not.

A loop that zeroes hands the optimizer a fresh gradient each step: with the default
``zero_grad(set_to_none=True)`` these are new tensors, which gradwatch sees on the host
(:class:`~gradwatch.evidence.GradCarry`) and which settles the question without any device work.
Only where the tensors persist (``set_to_none=False``, or no ``zero_grad``) a strided sample of the
gradients is compared with last step's on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_range
from gradwatch.detectors.base import TINY, Detector, DetectorContext, Finding, Persistence, StepEvidence
from gradwatch.evidence import GradSample

__all__ = ["Accumulating"]


class Accumulating(Detector):
    """``accumulating``: a layer's applied gradient is last step's plus a new one (``zero_grad`` missing).

    Per layer, a step counts when the layer's gradient tensors are last step's objects, the cosine of
    its sampled gradient with last step's exceeds ``min_cos`` and its norm grew. The alert fires after
    ``persist`` consecutive such steps and names the layers.

    Defaults: ``min_cos=0.9``: a carried sum passes it from the fourth step even when fresh
    gradients are nearly independent (pairwise cosine 0.2: 0.77, 0.88, 0.92, 0.95 at steps 1-4),
    while minibatch gradients of a loop that zeroes have cosines well below it (batch noise);
    requiring the norm to grow at every one of ``persist=5`` steps as well leaves out a
    full-batch loop (cosine near 1) whose gradient shrinks as it converges. Silent by construction
    for loops that zero with ``set_to_none=True`` (new tensors every step), for real gradient
    accumulation (one ``step()`` per several backwards, zeroed after it: each step's gradient is
    new) and for ``zero_grad(set_to_none=False)`` (the sum restarts at every step: no steady growth,
    the cosine of independent batches).

    The samples are taken on the step (only where tensors persist); the comparison runs at the
    logging step, vectorised over the steps since the last one.

    Args:
        min_cos: threshold on the cosine between consecutive applied gradients.
        persist: consecutive steps the condition must hold.
    """

    def __init__(self, min_cos: float = 0.9, persist: int = 5) -> None:
        super().__init__()
        self.min_cos = check_range("min_cos", min_cos, 0.0, 1.0)
        self.persist = check_int("persist", persist, 2)
        self._prev: Tensor | None = None
        self._rows: list[tuple[int, GradSample | None]] = []

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        n = len(ctx.layers)
        self.carried = Persistence(self.state, "carried", n, self.persist)
        self.state.bind(ctx.device)
        self._none = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        self._prev = None
        self._rows = []

    def update(self, ev: StepEvidence) -> None:
        if ev.carried is None and self._prev is None and not any(r[1] is not None for r in self._rows):
            return  # nothing carried now nor pending: nothing to fold (the common case)
        self._rows.append((ev.stats.step, ev.carried))
        if len(self._rows) >= 64:  # bound what is kept alive between two reads
            self.fold()

    def fold(self) -> None:
        """Compare each recorded sample with the previous step's (device only) and advance the streaks."""
        rows, self._rows = self._rows, []
        if not rows or self.ctx is None:
            return
        n = len(self._none)
        conds, values, steps = [], [], []
        for step, sample in rows:
            prev, self._prev = self._prev, (sample.values if sample is not None else None)
            steps.append(float(step))
            if sample is None or prev is None or prev.shape != sample.values.shape:
                conds.append(self._none)
                values.append(self._none.to(torch.float32))
                continue
            s = sample.values
            both = torch.stack([s * prev, s * s, prev * prev])
            dot, n2, p2 = torch.zeros(3, n, device=s.device).index_add_(1, sample.layer, both).unbind(0)
            cos = dot / (n2 * p2).sqrt().clamp_min(TINY)
            conds.append(sample.carried & (cos > self.min_cos) & (n2 > p2) & torch.isfinite(n2))
            values.append(cos)
        dev = self._none.device
        step_t = torch.tensor(steps, dtype=torch.float32).to(dev, non_blocking=True)
        self.carried.update_window(torch.stack(conds), torch.stack(values), step_t)

    def readout(self) -> dict[str, Tensor]:
        self.fold()
        return super().readout()

    def state_dict(self) -> dict[str, Any]:
        self.fold()
        return super().state_dict()

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        names = self.ctx.names
        hits = self.carried.fired(values)
        if not hits:
            return []
        first = min(hits, key=lambda h: (h.step, h.index))
        layers = tuple(names[h.index] for h in sorted(hits, key=lambda h: h.index))
        more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
        start = first.step - self.persist
        return [
            Finding(
                "accumulating",
                "carried",
                first.step,
                names[first.index],
                first.value,
                self.min_cos,
                "warning",
                f"Gradients carried over across optimizer steps at step {first.step}: since step {start} the gradient "
                f"of {names[first.index]}{more} is the previous step's plus a new one (cosine {first.value:.3f} with "
                f"the previous step's, growing at every step): it is not zeroed between optimizer steps.",
                layers,
                evidence=(("cosine", first.value), ("steps", float(self.persist))),
            )
        ]
