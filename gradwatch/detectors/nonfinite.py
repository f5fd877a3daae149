"""NaN or Inf in the gradients."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwatch.detectors._common import HostChecked, HostRow, HostRows
from gradwatch.detectors.base import DetectorContext, Finding, Fired, _flatten

__all__ = ["NonFinite"]


class NonFinite(HostChecked):
    """NaN or Inf in any gradient; reports the layers, in backward order (where they appear first).

    Steps are recorded as they come (no device op) and their flags (whether the step was non-finite,
    and which layers) travel in the logging step's one transfer: the first non-finite step since the
    last read is latched, on the host, with its layers.
    """

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self.fired_step = -1.0  # the latched step (-1: none since the last read)
        self.fired_layers = [0.0] * len(ctx.layers)  # its layers (1: non-finite); kept after the read
        self._bound(ctx, HostRows(
            {"any_nonfinite": lambda ev: ev.stats.any_nonfinite, "nonfinite": lambda ev: ev.stats.nonfinite}
        ))

    def _run(self, rows: list[HostRow]) -> None:
        """Latch the first non-finite row (when the latch is free)."""
        if self.fired_step >= 0:
            return
        for step, _, cols, _ in rows:
            if cols["any_nonfinite"][0] > 0:
                self.fired_step, self.fired_layers = float(step), [float(x) for x in cols["nonfinite"]]
                return

    def state_dict(self) -> dict[str, Any]:
        if not self.state.bound:
            return self._unbound_state()
        assert self.ctx is not None
        self._fold_pending()
        dev = self.ctx.device
        return {
            "nonfinite": {
                "fired_step": torch.tensor([self.fired_step], dtype=torch.float32, device=dev),
                "fired_layers": torch.tensor(self.fired_layers, dtype=torch.float32, device=dev),
            }
        }

    def _load(self, state: dict[str, Any]) -> None:
        flat = {k: torch.as_tensor(v).detach().cpu() for k, v in _flatten(state).items()}
        n = len(self.fired_layers)
        if "nonfinite.fired_layers" in flat:
            layers = flat["nonfinite.fired_layers"]
            if layers.shape != (n,):
                raise ValueError(
                    f"`state` holds 'nonfinite.fired_layers' of shape {tuple(layers.shape)} but this detector keeps "
                    f"({n},)"
                )
            self.fired_layers = [float(x) for x in layers.tolist()]
        if "nonfinite.fired_step" in flat:
            self.fired_step = float(flat["nonfinite.fired_step"].reshape(-1)[0])

    def _fired(self) -> list[Fired]:
        if self.fired_step < 0:
            return []
        step, self.fired_step = self.fired_step, -1.0
        return [Fired(0, int(step), math.nan, {"layers": self.fired_layers})]

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        self._run(self._rows.rows(values))
        if self.fired_step < 0:
            return []
        out = []
        names = self.ctx.names
        for f in self._fired():
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
