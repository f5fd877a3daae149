"""Parameters the optimizer updates but the loss never reaches.

A layer whose parameters get no gradient (``None``, or an exactly zero gradient that backward never
wrote: :class:`~gradwatch.evidence.ReachProbe`) while other layers do is outside the loss's graph:
a module built but unused in ``forward``, an output taken through ``.detach()``/``.item()``/
``torch.no_grad()``. Frozen parameters (``requires_grad=False``) are not watched at all, and
parameters outside every optimizer are left out when gradwatch knows the optimizer: nobody expects
them to learn.

Steps are recorded by reference and folded at the logging step, vectorised over the steps
(:class:`~gradwatch.detectors._common.WindowedChecks`): no device op on the other steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradwatch._checks import check_int
from gradwatch.detectors._common import WindowedChecks, grad_window
from gradwatch.detectors.base import DetectorContext, Finding, Latch, StepEvidence, stacked

__all__ = ["NoGradient", "blocked_zero"]


def blocked_zero(rows: list[StepEvidence], grad_sq: Tensor, present: Tensor, ctx: DetectorContext) -> Tensor | None:
    """``[T, n]``: an exactly zero gradient that backward computed but nothing in the model explains.

    An exact zero reaches a layer that backward does reach in three ways: zero weights downstream (an
    all-zero init), a layer of activations that are all off (dead ReLUs) or all saturated downstream,
    or a factor of exactly 0 outside the weights (a constant 0 gate, a mask). With no weight matrix all
    zeros (read on the device at the fold, the weights themselves: a layer's norm also counts its bias)
    and every tracked activation layer partly alive, only the last is left: the layer gets no gradient as
    surely as one the loss never reaches. Without tracked activations nothing is claimed (``None``: all
    False, at no device op), and ``vanishing``'s zero check keeps the layer.
    """
    if not ctx.weight_layers or any(ev.activations is None for ev in rows):
        return None
    dead = stacked(rows, "act_dead", lambda ev: ev.activations.dead)  # type: ignore[union-attr]
    saturated = stacked(rows, "act_saturated", lambda ev: ev.activations.saturated)  # type: ignore[union-attr]
    seen = stacked(rows, "act_seen", lambda ev: ev.activations.seen)  # type: ignore[union-attr]
    if dead.shape[-1] == 0:
        return None
    # A whole layer off (every unit zero on the batch) or pinned to its asymptotes passes (almost) no gradient.
    off = (seen & ((dead >= 1.0) | (saturated >= 1.0))).any(-1)
    weights = [p for i in ctx.weight_layers for p in ctx.layers[i].params if p.dim() >= 2]
    if not weights:
        return None

    def all_zero() -> Tensor:  # a weight matrix that is exactly 0 everywhere (device ops, no host read)
        with torch.no_grad():  # one foreach kernel for every matrix: ops that do not grow with depth
            peaks = torch._foreach_norm(weights, float("inf"))
        return torch.stack([x.to(grad_sq.device, torch.float32) for x in peaks]).eq(0).any()

    zero_weights = rows[-1].derived("zero_weight_matrix", all_zero)
    explained = zero_weights | off
    return present & (grad_sq == 0) & ~explained.expand(grad_sq.shape[0]).unsqueeze(-1)


class NoGradient(WindowedChecks):
    """``no_gradient``: an optimised (or, without a known optimizer, trainable) layer gets no gradient.

    Checks:

    * ``missing``: a layer in scope got no gradient (``None``, or zero where backward never reached
      it) for ``window`` consecutive steps while another layer in scope got a non-zero one.
      Default 20: a layer used on a random subset of steps (stochastic depth, a routed expert, a
      task head on alternate batches) with probability q >= 1/2 per step misses 20 steps in a row
      with probability <= 2^-20 ~ 1e-6, so only a layer that is never used reaches it.
    * ``inert``: the optimizer holds parameters, all with ``requires_grad=False``, and none of the
      watched ones: ``optimizer.step()`` can change nothing. Certain from the first step: no window.

    An exactly zero gradient that backward did compute is ``no_gradient``'s only when nothing in the
    model explains it (:func:`blocked_zero`: a constant 0 gate, a mask); zero weights or dead units
    downstream are ``vanishing``'s and ``dead``'s.

    Args:
        window: consecutive steps without a gradient.
    """

    sources = (("missing", True),)

    def __init__(self, window: int = 20) -> None:
        self.window_steps = check_int("window", window, 1)
        super().__init__(self.window_steps)
        self._idle = False

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        n = len(ctx.layers)
        self.inert = Latch(self.state, "inert", 1)
        self.state.bind(ctx.device)
        self._true = torch.ones(1, dtype=torch.bool, device=ctx.device)
        self._all = torch.ones(n, dtype=torch.bool, device=ctx.device)
        self._none = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        self._inert_pending: int | None = None
        self._zero_streak: Tensor | None = None  # the streak tensor known to be 0 everywhere
        self._zeroed = False  # steps with no layer missing were folded on the host: every streak is 0
        self._blocks = bool(ctx.weight_layers)  # blocked_zero may claim a layer (with tracked activations)
        self._idle = False  # the last readout found both latches known free, and no fold latched since

    def update(self, ev: StepEvidence) -> None:
        if ev.optimizer_inert and self._inert_pending is None:
            self._inert_pending = ev.stats.step  # host-known: latched at the fold
        if (
            not self.window.rows
            and ev.unreached is None
            and (ev.activations is None or not self._blocks)
            and all(ev.stats.present_host)
        ):
            # Known on the host (_none_missing) with nothing recorded before it: no layer can be missing, so every
            # streak is 0 after this step and nothing latches; folded now, without keeping the step.
            if ev.stats.param_norm is not None:  # the weight norms the next fold starts from
                self._param_norm = ev.stats.param_norm
            self._zeroed = True
            return
        super().update(ev)

    def fold(self) -> None:
        if self._inert_pending is not None:
            self._idle = False
            step = torch.full((), float(self._inert_pending), device=self._true.device)
            self.inert.update(self._true, step, value=self._true.to(torch.float32))
            self._inert_pending = None
        if self._zeroed:
            self._zeroed = False
            self._zero_streaks()
        rows = self.window.rows
        if rows and self._none_missing(rows):
            # Known on the host: no layer can be missing on any of these steps, so every streak is 0 and nothing
            # latches (no device op once the streaks are known to be 0).
            self.window.take()
            for ev in rows:  # the weight norms the next fold starts from, as the full fold keeps them
                if ev.stats.param_norm is not None:
                    self._param_norm = ev.stats.param_norm
            self._zero_streaks()
            return
        self._idle = False
        super().fold()

    def _zero_streaks(self) -> None:
        """Every streak 0 (no device op once the streak tensor is known to be 0)."""
        if self.checks.streak is not self._zero_streak:
            self._zero_streak = torch.zeros_like(self.checks.streak)
            self.state["checks.streak"] = self._zero_streak

    def readout(self) -> dict[str, Tensor]:
        if self._idle and not self.window.rows and self._inert_pending is None:
            # Nothing recorded, nothing latched since a readout found both latches free: nothing to read.
            if self._zeroed:
                self._zeroed = False
                self._zero_streaks()
            return {}
        self.fold()
        out = self.state.readout()
        self._idle = not out
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._idle = False  # the latches may hold entries
        super().load_state_dict(state)

    def _none_missing(self, rows: list[StepEvidence]) -> bool:
        """Whether the host knows that no layer is missing on any of ``rows``: every layer has a gradient
        tensor, backward reached every probed layer, and no exact zero can count as blocked (:func:`blocked_zero`
        claims nothing without tracked activations)."""
        assert self.ctx is not None
        if self.ctx.weight_layers and all(ev.activations is not None for ev in rows):
            return False
        return all(ev.unreached is None and all(ev.stats.present_host) for ev in rows)

    def conditions(self, rows: list[StepEvidence], param_norm: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        assert self.ctx is not None
        win = grad_window(rows)
        grad_sq, present = win.grad_sq, win.present
        got = present & (grad_sq != 0)  # NaN/Inf count as a gradient: nonfinite reports them
        # Unreached, or reached but multiplied by an exact 0 that neither zero weights nor dead units explain.
        missing = ~present
        if any(ev.unreached is not None for ev in rows):
            unreached = stacked(rows, "unreached", lambda ev: ev.unreached if ev.unreached is not None else self._none)
            missing = missing | (unreached & present & (grad_sq == 0))
        blocked = blocked_zero(rows, grad_sq, present, self.ctx)
        if blocked is not None:
            missing = missing | blocked
        if any(ev.optimized is not None for ev in rows):
            scope = stacked(rows, "optimized", lambda ev: ev.optimized if ev.optimized is not None else self._all)
            missing, got = scope & missing, got & scope
        # win.norm is [T, L]: the value where the entry fires.
        return [missing & got.any(-1, keepdim=True)], [win.norm]

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        if not values:  # both latches were known free: nothing to read
            return []
        assert self.ctx is not None
        hits = self.fired_by_source(values)["missing"]
        inert = self.inert.fired(values)
        if not hits and not inert:
            return []
        names = self.ctx.names
        out: list[Finding] = []
        if hits:
            first = min(hits, key=lambda h: (h.step, h.index))
            layers = tuple(names[h.index] for h in sorted(hits, key=lambda h: h.index))
            more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
            since = first.step - self.window_steps + 1
            out.append(
                Finding(
                    "no_gradient",
                    "missing",
                    first.step,
                    names[first.index],
                    float(self.window_steps),
                    float(self.window_steps),
                    "warning",
                    f"No gradient at step {first.step}: {names[first.index]}{more} got none for {self.window_steps} "
                    f"steps (since step {since}) while the other layers did: the loss never reaches it.",
                    layers,
                )
            )
        for f in inert:
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
