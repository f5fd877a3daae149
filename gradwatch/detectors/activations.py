"""Dead ReLU units and saturated sigmoid/tanh outputs (``track_activations=True``)."""

from __future__ import annotations

import torch

from gradwatch._checks import check_int, check_range
from gradwatch.detectors.base import Detector, DetectorContext, Finding, Persistence, StepEvidence

__all__ = ["Dead", "Saturated"]


class _ActivationDetector(Detector):
    kind = ""
    stat = ""  # attribute of ActivationStats that holds the fraction
    wanted: tuple[str, ...] = ()
    template = ""  # message, formatted with where, step, value

    def __init__(self, threshold: float, persist: int) -> None:
        super().__init__()
        self.persist = check_int("persist", persist, 1)
        self.threshold = check_range("threshold", threshold, 0.0, 1.0)

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        n = len(ctx.activation_names)
        self.check = Persistence(self.state, "act", n, self.persist)
        mask = [k in self.wanted and not ex for k, ex in zip(ctx.activation_kinds, ctx.excluded_activations)]
        self._mask = torch.tensor(mask, dtype=torch.bool, device=ctx.device)
        self._tracked = bool(mask)  # any activation layer (a host bool: no tensor __len__ per step)
        self.state.bind(ctx.device)

    def update(self, ev: StepEvidence) -> None:
        acts = ev.activations
        if acts is None or not self._tracked:
            return
        frac = getattr(acts, self.stat)
        cond = self._mask & acts.seen & (frac > self.threshold)
        self.check.update(cond, frac, ev.step)

    def readout(self) -> dict[str, torch.Tensor]:
        return super().readout() if self._tracked else {}

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        if not values:
            return []
        assert self.ctx is not None
        hits = self.check.fired(values)
        if not hits:
            return []
        names = self.ctx.activation_names
        top = max(hits, key=lambda h: h.value)
        layers = tuple(names[h.index] for h in sorted(hits, key=lambda h: -h.value))
        more = f" (and {len(layers) - 1} more)" if len(layers) > 1 else ""
        message = self.template.format(where=names[top.index] + more, step=top.step, value=top.value)
        return [
            Finding(
                self.kind, "act", min(h.step for h in hits), names[top.index], top.value, self.threshold, "warning",
                message, layers,
            )
        ]


class Dead(_ActivationDetector):
    """ReLU-family units that output zero for every sample of the batch.

    Needs ``track_activations=True``. A unit (feature, or channel for conv maps) is dead in a
    step when it is zero on the whole batch; the alert fires when more than ``threshold`` of a
    module's units are dead for ``persist`` steps. Default 0.9: healthy deep He-init ReLU MLPs
    already have 30-50% of their deep units zero on a whole batch of 64 (inputs grow correlated
    with depth; measured at init and through 150 Adam steps), so only a near-total collapse is
    an alert -- at 90% the layer passes a tenth of its gradient.
    """

    kind = "dead"
    stat = "dead"
    wanted = ("relu",)
    template = "Dead units at step {step}: {value:.0%} of the units of {where} output zero on every sample."

    def __init__(self, threshold: float = 0.9, persist: int = 3) -> None:
        super().__init__(threshold, persist)


class Saturated(_ActivationDetector):
    """Sigmoid/tanh outputs pinned near their asymptotes, where the derivative is ~0.

    Needs ``track_activations=True``. An output is saturated when sigmoid's is within 0.01 of 0
    or 1, or tanh's magnitude exceeds 0.99 (derivative below ~0.01 / 0.02). The alert fires when
    more than ``threshold`` of a module's outputs are saturated for ``persist`` steps. Default
    0.9: tanh MLPs trained with Adam at lr 1e-2 reach 50-66% saturation and still learn, while at
    90% the layer passes at most a tenth of its gradient. Activations after the last weight
    layer (an output sigmoid) are excluded: confident predictions are their purpose.
    """

    kind = "saturated"
    stat = "saturated"
    wanted = ("sigmoid", "tanh")
    template = "Saturated activations at step {step}: {value:.0%} of the outputs of {where} sit at their asymptotes."

    def __init__(self, threshold: float = 0.9, persist: int = 3) -> None:
        super().__init__(threshold, persist)
