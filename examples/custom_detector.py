"""A detector of your own: fire when one named layer's gradient norm leaves a band you give.

Run:  python examples/custom_detector.py        (CPU, a second)

A detector declares its device state once in ``bind`` (here one :class:`gw.Persistence`: a streak
and the "fired at step" latch), folds each step's :class:`gw.StepEvidence` into it with tensor
operations only in ``update`` (no host read), and turns the values read back at logging steps into
:class:`gw.Finding` objects in ``collect``. Checkpointing, the one transfer per logging step,
de-duplication, remedies and the sinks come from gradwatch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw


class NormBand(gw.Detector):
    """``layer``'s gradient norm outside ``[low, high]`` for ``persist`` consecutive steps.

    Args:
        layer: the layer's qualified name (as in ``monitor.layers``).
        low, high: the band.
        persist: consecutive steps outside the band before it fires.
    """

    kind = "out_of_band"

    def __init__(self, layer: str, low: float, high: float, persist: int = 2) -> None:
        super().__init__()
        if not 0 <= low < high:
            raise ValueError(f"`low` and `high` must satisfy 0 <= low < high; got low={low!r}, high={high!r}")
        self.layer, self.low, self.high, self.persist = layer, low, high, persist

    def bind(self, ctx: gw.DetectorContext) -> None:
        super().bind(ctx)
        if self.layer not in ctx.names:
            raise ValueError(f"`layer` {self.layer!r} is not a layer of this model; layers: {ctx.names}")
        self.index = ctx.names.index(self.layer)
        self.out = gw.Persistence(self.state, "out", 1, self.persist)
        self.state.bind(ctx.device)

    def update(self, ev: gw.StepEvidence) -> None:
        g = ev.stats.grad_norm[self.index].reshape(1)
        present = ev.stats.present[self.index].reshape(1)
        self.out.update(present & ((g < self.low) | (g > self.high)), g, ev.step)

    def collect(self, values: dict[str, list[float]], step: int) -> list[gw.Finding]:
        return [
            gw.Finding(
                kind=self.kind,
                source="band",
                step=f.step,
                layer=self.layer,
                value=f.value,
                threshold=self.high if f.value > self.high else self.low,
                severity="warning",
                message=f"gradient norm of {self.layer} is {f.value:.3g}, outside [{self.low:g}, {self.high:g}] "
                f"for {self.persist} steps",
            )
            for f in self.out.fired(values)
        ]


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    band = NormBand("2", low=1e-3, high=10.0)
    monitor = gw.GradWatch(model, detectors=[*gw.default_detectors(), band], sinks=[], log_every=5,
                           on_alert="ignore")
    for step in range(20):
        x = torch.randn(16, 8) * (20.0 if step >= 12 else 1.0)  # the inputs blow up at step 12
        loss = F.mse_loss(model(x), x[:, :1])
        loss.backward()
        monitor.step(loss=loss)
        opt.step()
        opt.zero_grad()
    monitor.close()
    for a in monitor.alerts:
        print(f"{a.kind} at step {a.step} on {a.layer}: {a.message}")
    state = monitor.state_dict()["detectors"][-1]
    print(f"checkpointed state of NormBand: {sorted(state['out'])}")


if __name__ == "__main__":
    main()
