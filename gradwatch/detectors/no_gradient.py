"""Parameters the optimizer updates but the loss never reaches.

A layer whose parameters get no gradient (``None``, or an exactly zero gradient that backward never
wrote: :class:`~gradwatch.evidence.ReachProbe`) while other layers do is outside the loss's graph:
a module built but unused in ``forward``, an output taken through ``.detach()``/``.item()``/
``torch.no_grad()``. Frozen parameters (``requires_grad=False``) are not watched at all, and
parameters outside every optimizer are left out when gradwatch knows the optimizer: nobody expects
them to learn.
"""

from __future__ import annotations

import torch

from gradwatch._checks import check_int
from gradwatch.detectors.base import Detector, DetectorContext, Finding, Latch, Persistence, StepEvidence

__all__ = ["NoGradient"]


class NoGradient(Detector):
    """``no_gradient``: an optimised (or, without a known optimizer, trainable) layer gets no gradient.

    Checks:

    * ``missing``: a layer in scope got no gradient (``None``, or zero where backward never reached
      it) for ``window`` consecutive steps while another layer in scope got a non-zero one.
      Default 20: a layer used on a random subset of steps (stochastic depth, a routed expert, a
      task head on alternate batches) with probability q >= 1/2 per step misses 20 steps in a row
      with probability <= 2^-20 ~ 1e-6, so only a layer that is never used reaches it.
    * ``inert``: the optimizer holds parameters, all with ``requires_grad=False``, and none of the
      watched ones: ``optimizer.step()`` can change nothing. Certain from the first step: no window.

    An exactly zero gradient that backward did compute (dead units upstream, zero weights
    downstream) is not ``no_gradient``: ``vanishing`` and ``dead`` report it.

    Args:
        window: consecutive steps without a gradient.
    """

    def __init__(self, window: int = 20) -> None:
        super().__init__()
        self.window = check_int("window", window, 1)

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        n = len(ctx.layers)
        self.missing = Persistence(self.state, "missing", n, self.window)
        self.inert = Latch(self.state, "inert", 1)
        self.state.bind(ctx.device)
        self._true = torch.ones(1, dtype=torch.bool, device=ctx.device)
        self._all = torch.ones(n, dtype=torch.bool, device=ctx.device)

    def update(self, ev: StepEvidence) -> None:
        st = ev.stats
        scope = ev.optimized if ev.optimized is not None else self._all
        got = st.present & (st.grad_norm != 0)  # NaN/Inf count as a gradient: nonfinite reports them
        missing = ~st.present
        if ev.unreached is not None:
            missing = missing | (ev.unreached & st.present & (st.grad_norm == 0))
        others = (got & scope).any()
        self.missing.update(scope & missing & others, st.grad_norm, ev.step)
        if ev.optimizer_inert:
            self.inert.update(self._true, ev.step, value=self._true.to(torch.float32))

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        names = self.ctx.names
        out: list[Finding] = []
        hits = self.missing.fired(values)
        if hits:
            first = min(hits, key=lambda h: (h.step, h.index))
            layers = tuple(names[h.index] for h in sorted(hits, key=lambda h: h.index))
            more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
            since = first.step - self.window + 1
            out.append(
                Finding(
                    "no_gradient",
                    "missing",
                    first.step,
                    names[first.index],
                    float(self.window),
                    float(self.window),
                    "warning",
                    f"No gradient at step {first.step}: {names[first.index]}{more} got none for {self.window} steps "
                    f"(since step {since}) while the other layers did: the loss never reaches it.",
                    layers,
                )
            )
        for f in self.inert.fired(values):
            watched = f"{len(names)} trainable layer(s) (from {names[0]})" if names else "the trainable layers"
            out.append(
                Finding(
                    "no_gradient",
                    "inert",
                    f.step,
                    None,
                    0.0,
                    0.0,
                    "error",
                    f"No gradient at step {f.step} for anything the optimizer updates: it holds only parameters "
                    f"with requires_grad=False, so optimizer.step() changes nothing, while {watched} get gradients "
                    "that no optimizer applies.",
                )
            )
        return out
