"""NaN or Inf in the gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradwatch.detectors.base import (
    Detector,
    DetectorContext,
    Finding,
    Latch,
    StepEvidence,
    Window,
    stacked,
    window_steps,
)

__all__ = ["NonFinite"]


class NonFinite(Detector):
    """NaN or Inf in any gradient; reports the layers, in backward order (where they appear first).

    Steps are recorded as they come (no device op) and folded at the next read: the first
    non-finite step of the window is latched with its layers.
    """

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        # One model-wide entry; the layers that were non-finite at that step ride along as a vector.
        self.latch = Latch(self.state, "nonfinite", 1, values={"layers": len(ctx.layers)})
        self.window = Window()
        self.state.bind(ctx.device)

    def update(self, ev: StepEvidence) -> None:
        if self.window.add(ev):
            self.fold()

    def fold(self) -> None:
        """Latch the first non-finite step of the recorded window (device only)."""
        rows = self.window.take()
        if not rows:
            return
        assert self.ctx is not None
        steps = window_steps(rows, self.ctx.device)
        if len(rows) == 1:  # log_every=1: the one step is the first (no search, no gather)
            stats = rows[0].stats
            self.latch.update(stats.any_nonfinite, steps, layers=stats.nonfinite)
            return
        bad = stacked(rows, "any_nonfinite", lambda ev: ev.stats.any_nonfinite).reshape(-1)
        first = bad.to(torch.uint8).argmax().reshape(1)  # the first non-finite row (0 when none is)
        flags = stacked(rows, "nonfinite", lambda ev: ev.stats.nonfinite)
        layers = flags.index_select(0, first).squeeze(0) if flags.shape[0] == len(rows) else flags[0]
        # index_select, not [first]: indexing by a 0-d tensor would read it on the host (a device sync).
        self.latch.update(bad.any(), steps.index_select(0, first), layers=layers)

    def readout(self) -> dict[str, Tensor]:
        self.fold()
        return super().readout()

    def state_dict(self) -> dict[str, Any]:
        self.fold()
        return super().state_dict()

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        out = []
        names = self.ctx.names
        for f in self.latch.fired(values):
            flags = f.values["layers"]
            layers = tuple(names[i] for i in reversed(range(len(names))) if flags[i] > 0)
            shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
            out.append(
                Finding(
                    "nonfinite",
                    "grad",
                    f.step,
                    layers[0] if layers else None,
                    float(len(layers)),
                    0.0,
                    "error",
                    f"Non-finite gradients (NaN/Inf) at step {f.step} in {len(layers)} layer(s), first in "
                    f"backward order: {shown}.",
                    layers,
                )
            )
        return out
