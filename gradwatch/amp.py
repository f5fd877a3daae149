"""Automatic mixed precision: true (unscaled) statistics and the scaler's overflow skips.

``torch.amp.GradScaler`` multiplies the loss by a scale ``S`` so that small float16 gradients do
not underflow; the gradients stay multiplied by ``S`` until ``scaler.unscale_(optimizer)`` (or
``scaler.step``, which unscales first). When a scaled gradient overflows to inf/NaN the scaler
skips that optimizer step and halves ``S``: that is the scaler doing its job, not an alert.

:class:`AmpWatch` reads the scaler's own bookkeeping (its per-optimizer stage, its scale and growth
tracker, all kept by ``torch/amp/grad_scaler.py``) without a host sync:

* :meth:`AmpWatch.inv_scale` is ``1/S`` while the gradients are still scaled (the optimizer's
  stage is ``READY``: no ``unscale_`` yet), ``None`` once they are unscaled;
* :meth:`AmpWatch.update` counts the steps the scaler skipped, both those the monitor saw (its
  ``step()`` ran on non-finite gradients) and those it never saw (under ``attach``, a skipped
  ``optimizer.step`` runs no pre-hook), the latter inferred from how far ``S`` fell, and fires
  when a run of consecutive skips is too long to be calibration.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch.detectors.base import DeviceState, Finding, Latch

# How long a run of consecutive overflow skips may be before it is an alert. Each skip multiplies
# the scale by the backoff factor (0.5). float16's largest finite value is 65504 ~ 2^16 and
# GradScaler starts at 2^16, so 16 halvings take the scale from its start down to 1, across the
# whole range a scale can usefully span: calibrating from the initial scale to any gradient that
# float16 can hold, recovering from a growth step (1 skip) or from a 2^k jump of the gradients
# (k skips) all take fewer. A run of 16 (2^16 in scale) means the gradients are non-finite at any
# scale (a NaN loss, a real explosion), and training makes no progress while it lasts.
_RUN_SPAN = 16.0 * math.log(2.0)


def overflow_run_limit(backoff_factor: float) -> int:
    """Consecutive skips after which the scale has fallen by 2^16 (16 for the default backoff 0.5)."""
    return max(1, math.ceil(_RUN_SPAN / math.log(1.0 / backoff_factor) - 1e-9))


def check_scaler(scaler: Any) -> None:
    """Raise ``ValueError`` unless ``scaler`` is ``None`` or a ``torch.amp.GradScaler``."""
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise ValueError(
            f"`scaler` must be None or a torch.amp.GradScaler (the one your loop uses); got {type(scaler).__name__}"
        )


class AmpWatch:
    """What gradwatch needs to know about a ``GradScaler``.

    Args:
        scaler: the ``torch.amp.GradScaler`` of the training loop.
    """

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        check_scaler(scaler)
        self.scaler = scaler
        # A disabled scaler has no factors (and never skips); keep the default limit.
        self.limit = overflow_run_limit(scaler.get_backoff_factor() if scaler.is_enabled() else 0.5)
        self.device = torch.device("cpu")
        self.state = DeviceState()
        st = self.state
        # The previous observation: the scale (NaN: none yet), the growth tracker, whether it overflowed.
        st.add_state("prev_scale", lambda dev: torch.full((), math.nan, device=dev))
        st.add_state("prev_tracker", lambda dev: torch.zeros((), device=dev))
        st.add_state("prev_nf", lambda dev: torch.zeros((), device=dev))
        st.add_state("run", lambda dev: torch.zeros((), device=dev))  # consecutive skips so far
        st.add_state("fired_in_run", lambda dev: torch.zeros((), device=dev))  # 1 once this run was reported
        st.add_state("overflow_total", lambda dev: torch.zeros((), device=dev))
        self.latch = Latch(st, "overflow", 1)

    @property
    def active(self) -> bool:
        """Whether the scaler is enabled and has scaled a loss (then it owns inf/NaN gradients)."""
        return bool(self.scaler.is_enabled()) and getattr(self.scaler, "_scale", None) is not None

    def inv_scale(self, optimizer: torch.optim.Optimizer | None = None) -> Tensor | None:
        """``1/scale`` (a device tensor) while the gradients are still scaled, else ``None``.

        With ``optimizer`` (known under ``attach``) its own stage decides; without, the gradients
        count as scaled until ``unscale_`` or ``step`` has run for some optimizer this iteration.
        Optimizers with built-in AMP support (``fused=True``) keep the gradients scaled inside
        ``scaler.step``: their stage stays ``READY`` and the division still applies.
        """
        if not self.active:
            return None
        from torch.amp.grad_scaler import OptState

        states = self.scaler._per_optimizer_states
        if optimizer is not None:
            st = states.get(id(optimizer))  # .get: do not create an entry in the scaler's defaultdict
            scaled = st is None or st["stage"] is OptState.READY
        else:
            scaled = all(st["stage"] is OptState.READY for st in states.values())
        if not scaled:
            return None
        scale = self.scaler._scale
        assert scale is not None
        # As GradScaler.unscale_: the reciprocal in float64, then float32.
        return scale.double().reciprocal().float()

    def bind(self, device: torch.device) -> None:
        """Allocate the device state (a state loaded before is applied now)."""
        self.device = torch.device(device)
        self.state.bind(self.device)

    def update(self, nonfinite: Tensor | None, step_t: Tensor) -> None:
        """Fold one observation into the overflow-run count (device only).

        Args:
            nonfinite: whether this step's gradients hold inf/NaN (``None`` at close: no step).
            step_t: the current step as a device tensor.
        """
        if not self.active:
            return
        st = self.state
        s = self.scaler
        nf = nonfinite.to(self.device, torch.float32) if nonfinite is not None else torch.zeros((), device=self.device)
        cur = s._scale.to(self.device, torch.float32)  # type: ignore[union-attr]
        tracker = s._growth_tracker.to(self.device, torch.float32)  # type: ignore[union-attr]
        prev = st.prev_scale
        known = torch.isfinite(prev)
        # Between two observations the scale changed by growth^g * backoff^n: the update after a
        # finite step grows the scale when its tracker reaches growth_interval, each skip backs off.
        grew = (1.0 - st.prev_nf) * (st.prev_tracker + 1.0 >= s.get_growth_interval()).float()
        expected = prev * torch.where(grew > 0, torch.full_like(prev, s.get_growth_factor()), torch.ones_like(prev))
        n = (torch.log(expected / cur) / math.log(1.0 / s.get_backoff_factor())).round().clamp_min(0.0)
        n = torch.where(known, n, torch.zeros_like(n))
        hidden = (n - st.prev_nf).clamp_min(0.0)  # skips this monitor did not see (attach)
        length = st.run * st.prev_nf + hidden + nf
        take = (length >= self.limit) & (st.fired_in_run < 1)
        self.latch.update(take, step_t.reshape(1), value=length.reshape(1))
        st.fired_in_run = torch.maximum(st.fired_in_run, take.float()) * nf
        st.run = length * nf
        st.overflow_total = st.overflow_total + hidden + nf
        st.prev_scale = cur.clone()
        st.prev_tracker = tracker
        if nonfinite is not None:
            st.prev_nf = nf

    def metric_tensors(self) -> dict[str, Tensor]:
        """``{"scale": ..., "overflow_steps": ...}``: 1-element float tensors for the logging-step transfer."""
        scale = getattr(self.scaler, "_scale", None)  # a disabled scaler has none
        if scale is None:
            scale = torch.full((), math.nan, device=self.device)
        scale = scale.to(self.device, torch.float32)
        return {"scale": scale.reshape(1), "overflow_steps": self.state.overflow_total.reshape(1)}

    def readout(self) -> dict[str, Tensor]:
        """Named tensors read back at logging steps (the overflow-run latch)."""
        return self.state.readout()

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        """Turn the read-back values (by name, as :meth:`readout` named them) into a finding."""
        out = []
        for f in self.latch.fired(values):
            s, v = f.step, int(f.value)
            out.append(
                Finding(
                    "nonfinite",
                    "amp_overflow",
                    s,
                    None,
                    float(v),
                    float(self.limit),
                    "error",
                    f"The GradScaler skipped {v} consecutive optimizer steps for inf/NaN gradients (up to step {s}): "
                    f"its scale fell {self.scaler.get_backoff_factor():g}^{v}-fold, far beyond calibration, so the "
                    "gradients are non-finite at any scale and training is not progressing.",
                )
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        """Device state (for checkpoints); ``{}`` before :meth:`bind`."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before or after :meth:`bind`)."""
        self.state.load_state_dict(state)
