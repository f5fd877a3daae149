"""NaN or Inf in the gradients."""

from __future__ import annotations

import torch

from gradwatch.detectors.base import Detector, DetectorContext, Finding, Latch, StepEvidence

__all__ = ["NonFinite"]


class NonFinite(Detector):
    """NaN or Inf in any gradient; reports the layers, in backward order (where they appear first)."""

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        # One model-wide entry; the layers that were non-finite at that step ride along as a vector.
        self.latch = Latch(self.state, "nonfinite", 1, values={"layers": len(ctx.layers)})
        self.state.bind(ctx.device)

    def update(self, ev: StepEvidence) -> None:
        self.latch.update(ev.stats.any_nonfinite, ev.step, layers=ev.stats.nonfinite.to(torch.float32))

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
