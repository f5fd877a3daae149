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

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_range
from gradwatch.detectors._common import fmt
from gradwatch.detectors.base import TINY, Detector, DetectorContext, Finding, Persistence, StepEvidence

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

    Args:
        min_cos: threshold on the cosine between consecutive applied gradients.
        persist: consecutive steps the condition must hold.
    """

    def __init__(self, min_cos: float = 0.9, persist: int = 5) -> None:
        super().__init__()
        self.min_cos = check_range("min_cos", min_cos, 0.0, 1.0)
        self.persist = check_int("persist", persist, 2)
        self._prev: Tensor | None = None

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        n = len(ctx.layers)
        # Per layer: the sampled gradient's norm when its current run of carried steps began.
        self.state.add_state("run_start", lambda dev: torch.zeros(n, device=dev))
        self.carried = Persistence(self.state, "carried", n, self.persist)
        self.state.bind(ctx.device)
        self._none = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        self._zeros = torch.zeros(n, device=ctx.device)
        self._prev = None

    def update(self, ev: StepEvidence) -> None:
        sample = ev.carried
        if sample is None or sample.values.numel() == 0:
            if self._prev is not None:  # new gradient tensors everywhere: nothing is carried, runs are over
                self.carried.update(self._none, self._zeros, ev.step)
                self._prev = None
            return
        prev, self._prev = self._prev, sample.values
        if prev is None or prev.shape != sample.values.shape:
            return
        n = len(self._zeros)
        s = sample.values

        def per_layer(x: Tensor) -> Tensor:
            return torch.zeros(n, device=x.device).index_add_(0, sample.layer, x)

        dot, n2, p2 = per_layer(s * prev), per_layer(s * s), per_layer(prev * prev)
        cos = dot / (n2 * p2).sqrt().clamp_min(TINY)
        cond = sample.carried & (cos > self.min_cos) & (n2 > p2) & torch.isfinite(n2)
        st = self.state
        fresh = self.carried.streak == 0
        st.run_start = torch.where(fresh, p2.sqrt(), st.run_start)
        growth = n2.sqrt() / st.run_start.clamp_min(TINY)
        self.carried.update(cond, growth, ev.step)

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        names = self.ctx.names
        hits = self.carried.fired(values)
        if not hits:
            return []
        first = min(hits, key=lambda h: (h.step, h.index))
        top = max(hits, key=lambda h: h.value)
        layers = tuple(names[h.index] for h in sorted(hits, key=lambda h: h.index))
        more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
        start = first.step - self.persist
        return [
            Finding(
                "accumulating",
                "carried",
                first.step,
                names[first.index],
                top.value,
                self.min_cos,
                "warning",
                f"Gradients carried over across optimizer steps at step {first.step}: since step {start} the gradient "
                f"of {names[first.index]}{more} is the previous step's plus a new one (cosine > {self.min_cos:g} with "
                f"the previous step's, norm up {fmt(top.value)}x): it is not zeroed between optimizer steps.",
                layers,
                evidence=(("growth", top.value), ("steps", float(self.persist))),
            )
        ]
