"""Detectors: device-side checks of the per-layer statistics.

A detector sees every step's :class:`~gradwatch.stats.GradStats` in :meth:`Detector.update`,
keeps its running state (EMAs, streaks) as device tensors and does only tensor arithmetic there,
so it never waits for the device. At logging steps the monitor reads every detector's
:meth:`Detector.pending` tensors back in the same single transfer as the metrics and hands the
host values to :meth:`Detector.collect`, which turns them into :class:`Finding` objects.

Each default threshold is chosen from the physics of the failure, with a wide margin to what
healthy training shows (figures measured on CPU with torch 2.13; see DESIGN.md):

* healthy networks (He-init ReLU, Xavier tanh, pre-LN transformers, BN ResNets) keep the ratio of
  the earliest to the latest layers' gradient RMS within ~1e-2..1e2; a sigmoid stack reaches
  1e-17, default-init deep ReLU 1e-7;
* healthy per-layer gradient-to-weight norm ratios stay below ~2; oversized init or exploding
  recurrences give 1e4 and more;
* a healthy total norm fluctuates to 2-3x its running mean, with log-norm z-scores up to ~4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_positive, check_range
from gradwatch.activations import ActivationStats
from gradwatch.layers import Layer
from gradwatch.stats import GradStats

# Weights whose RMS is below this are treated as deliberately zero-initialised (LoRA's B,
# zero-init residual branches, zero-init heads): a gradient-to-weight ratio means nothing there.
_ZERO_WEIGHT_RMS = 1e-6
_TINY = 1e-30


@dataclass(frozen=True)
class Finding:
    """What a detector found, before remedies are attached.

    Attributes:
        kind: alert kind (``"vanishing"``, ``"exploding"``, ...).
        source: which check inside the detector fired (de-duplication key with ``kind``).
        step: step at which the condition was established.
        layer: layer name or ``None`` for model-wide.
        value: the figure that crossed ``threshold``.
        threshold: the threshold.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: one sentence, with the layer and the figure.
        layers: every layer concerned, most relevant first.
    """

    kind: str
    source: str
    step: int
    layer: str | None
    value: float
    threshold: float
    severity: str
    message: str
    layers: tuple[str, ...] = ()


@dataclass
class DetectorContext:
    """What a detector may know about the model: the layers, never the modules."""

    layers: list[Layer]
    device: torch.device
    numel: Tensor  # float32[L]: elements per layer
    weight_layers: list[int] = field(default_factory=list)  # indices of weight layers, forward order
    activation_names: list[str] = field(default_factory=list)
    activation_kinds: list[str] = field(default_factory=list)  # "relu" | "sigmoid" | "tanh" | "other"
    excluded_activations: list[bool] = field(default_factory=list)  # True for output activations
    time_layers: list[str] = field(default_factory=list)  # recurrent modules profiled in time (track_time)

    @property
    def names(self) -> list[str]:
        """Layer names, in forward order."""
        return [layer.name for layer in self.layers]


@runtime_checkable
class Detector(Protocol):
    """The detector protocol: implement these five methods to add your own check.

    ``update`` must stay on the device (no ``.item()``, no ``if tensor``); ``pending`` returns
    1-D float tensors that the monitor reads back at logging steps; ``collect`` receives them as
    Python lists in the same order.
    """

    def bind(self, ctx: DetectorContext) -> None:
        """Allocate device state for these layers (called once, at the first step)."""

    def update(self, stats: GradStats, step_t: Tensor, activations: ActivationStats | None) -> None:
        """Fold this step's statistics into the running state (device only)."""

    def pending(self) -> list[Tensor]:
        """1-D float tensors to read back at the next logging step."""

    def collect(self, values: list[list[float]], step: int) -> list[Finding]:
        """Turn the read-back values into findings and clear what was pending."""

    def state_dict(self) -> dict[str, Any]:
        """Running state as a dict of tensors and numbers (for checkpoints)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class Persistence:
    """Device-side streak counter: a condition must hold ``persist`` consecutive steps.

    While it holds, the first step at which it was established (since the last read) and the
    value then are kept, so a condition seen between two logging steps is still reported with
    its own step.
    """

    def __init__(self, n: int, device: torch.device, persist: int) -> None:
        self.persist = persist
        self.streak = torch.zeros(n, device=device)
        self.fired_step = torch.full((n,), -1.0, device=device)
        self.fired_value = torch.zeros(n, device=device)

    def update(self, cond: Tensor, value: Tensor, step_t: Tensor) -> None:
        """Advance the streaks with this step's boolean condition and value."""
        self.streak = (self.streak + 1.0) * cond
        take = (self.streak >= self.persist) & (self.fired_step < 0)
        self.fired_step = torch.where(take, step_t, self.fired_step)
        self.fired_value = torch.where(take, value.to(torch.float32), self.fired_value)

    def pending(self) -> list[Tensor]:
        """``[fired_step, fired_value]``."""
        return [self.fired_step, self.fired_value]

    def clear(self) -> None:
        """Forget what was reported (after a read)."""
        self.fired_step = torch.full_like(self.fired_step, -1.0)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors of the state."""
        return {"streak": self.streak, "fired_step": self.fired_step, "fired_value": self.fired_value}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (onto this object's device)."""
        dev = self.streak.device
        self.streak = state["streak"].to(dev)
        self.fired_step = state["fired_step"].to(dev)
        self.fired_value = state["fired_value"].to(dev)


def _fired(values: list[list[float]], offset: int = 0) -> list[tuple[int, int, float]]:
    """(index, step, value) for each entry whose fired_step >= 0."""
    steps, vals = values[offset], values[offset + 1]
    return [(i, int(s), v) for i, (s, v) in enumerate(zip(steps, vals)) if s >= 0]


def _fmt(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


class _PersistentLayerDetector:
    """Shared machinery: several per-layer (or model-wide) conditions with a persistence each."""

    sources: tuple[tuple[str, bool], ...] = ()  # (name, per_layer)

    def __init__(self, persist: int) -> None:
        self.persist = check_int("persist", persist, 1)
        self._track: dict[str, Persistence] = {}
        self.ctx: DetectorContext | None = None

    def bind(self, ctx: DetectorContext) -> None:
        self.ctx = ctx
        n = len(ctx.layers)
        self._track = {
            name: Persistence(n if per_layer else 1, ctx.device, self.persist)
            for name, per_layer in self.sources
        }

    def pending(self) -> list[Tensor]:
        return [t for name, _ in self.sources for t in self._track[name].pending()]

    def _collect_fired(self, values: list[list[float]]) -> dict[str, list[tuple[int, int, float]]]:
        out = {}
        for k, (name, _) in enumerate(self.sources):
            out[name] = _fired(values, 2 * k)
            self._track[name].clear()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: t.state_dict() for name, t in self._track.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, t in self._track.items():
            if name in state:
                t.load_state_dict(state[name])


def _shared(stats: GradStats, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """Per-step memo kept on ``stats``: what several detectors derive from the same statistics
    (Vanishing and Exploding both need the depth profile and the gradient-to-weight ratios) is
    computed once per step. Each tensor op costs microseconds of dispatch on the per-step path."""
    memo = stats.__dict__.setdefault("_shared", {})
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _relative_to_weights(stats: GradStats, param_norm: Tensor, numel: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient-to-weight norm ratio per layer and where it is meaningful."""

    def make() -> tuple[Tensor, Tensor]:
        # A non-finite weight norm (weights already overflowed) would give a ratio of 0: not vanishing.
        valid = stats.present & (param_norm > _ZERO_WEIGHT_RMS * numel.sqrt()) & torch.isfinite(param_norm)
        ratio = stats.grad_norm / param_norm.clamp_min(_TINY)
        return ratio, valid

    # Keyed by identity: both tensors stay alive (held by the detectors and the context) while
    # ``stats`` lives, so an id cannot be reused within the memo's lifetime.
    return _shared(stats, ("relative", id(param_norm), id(numel)), make)


class _DepthProfile:
    """Ratio of the earliest to the latest weight layers' gradient RMS (geometric means).

    The earliest and latest quarter of the weight layers (at least one each) are compared, so a
    single unusual layer (a small head, a zero-initialised projection) cannot decide alone.
    """

    def __init__(self, ctx: DetectorContext) -> None:
        w = ctx.weight_layers
        k = max(1, len(w) // 4)
        n = len(ctx.layers)
        self.enabled = len(w) >= 3
        self.early = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        self.late = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        if self.enabled:
            self.early[w[:k]] = True
            self.late[w[-k:]] = True
        self.first_layer = w[0] if w else 0
        self._key = ("depth", tuple(w[:k]), tuple(w[-k:]))

    def log_ratio(self, stats: GradStats, numel: Tensor) -> tuple[Tensor, Tensor]:
        """log(early RMS / late RMS) and whether both groups had usable layers."""
        return _shared(stats, (*self._key, id(numel)), lambda: self._log_ratio(stats, numel))

    def _log_ratio(self, stats: GradStats, numel: Tensor) -> tuple[Tensor, Tensor]:
        rms = stats.grad_norm / numel.sqrt()
        usable = stats.present & (rms > 0) & torch.isfinite(rms)
        logs = torch.where(usable, rms.clamp_min(_TINY).log(), torch.zeros_like(rms))
        e = self.early & usable
        l_ = self.late & usable
        ne, nl = e.sum(), l_.sum()
        mean_e = (logs * e).sum() / ne.clamp_min(1)
        mean_l = (logs * l_).sum() / nl.clamp_min(1)
        return (mean_e - mean_l).reshape(1), ((ne > 0) & (nl > 0)).reshape(1)


class Vanishing(_PersistentLayerDetector):
    """Gradients too small to train the early layers.

    Three checks, each of which must hold for ``persist`` consecutive steps:

    * ``depth``: the earliest weight layers' gradient RMS is below ``depth_ratio`` times the
      latest layers' (geometric means over a quarter of the weight layers each). Default 1e-4:
      healthy nets stay above ~1e-2, default-init deep ReLU falls to ~1e-7, sigmoid to 1e-17.
    * ``zero``: a weight layer receives an exactly zero gradient while it has one (all-zero init,
      a fully dead layer upstream).
    * ``ratio``: a layer's gradient-to-weight norm ratio is below ``min_ratio``. Default 1e-8:
      with a learning rate <= 1 the relative update is then 10x below float32's resolution
      (1.2e-7), so SGD cannot change those weights at all.

    Args:
        depth_ratio: threshold on early/late gradient RMS.
        min_ratio: threshold on ||g|| / ||w|| per layer.
        persist: consecutive steps a condition must hold.
    """

    sources = (("depth", False), ("zero", True), ("ratio", True))

    def __init__(self, depth_ratio: float = 1e-4, min_ratio: float = 1e-8, persist: int = 3) -> None:
        super().__init__(persist)
        self.depth_ratio = check_range("depth_ratio", depth_ratio, 0.0, 1.0)
        self.min_ratio = check_range("min_ratio", min_ratio, 0.0, 1.0)
        self._param_norm: Tensor | None = None

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self._profile = _DepthProfile(ctx)
        self._weight = torch.zeros(len(ctx.layers), dtype=torch.bool, device=ctx.device)
        self._weight[ctx.weight_layers] = True

    def update(self, stats: GradStats, step_t: Tensor, activations: ActivationStats | None) -> None:
        assert self.ctx is not None
        if stats.param_norm is not None:
            self._param_norm = stats.param_norm
        if self._profile.enabled:
            log_r, ok = self._profile.log_ratio(stats, self.ctx.numel)
            cond = ok & (log_r < math.log(self.depth_ratio))
            self._track["depth"].update(cond, log_r.exp(), step_t)
        zero = stats.present & self._weight & (stats.grad_norm == 0)
        self._track["zero"].update(zero, stats.grad_norm, step_t)
        if self._param_norm is not None:
            ratio, valid = _relative_to_weights(stats, self._param_norm, self.ctx.numel)
            cond = valid & self._weight & (ratio < self.min_ratio) & (stats.grad_norm > 0)
            self._track["ratio"].update(cond, ratio, step_t)

    def collect(self, values: list[list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        names = self.ctx.names
        fired = self._collect_fired(values)
        out: list[Finding] = []
        for _, s, v in fired["depth"]:
            first = names[self._profile.first_layer]
            out.append(
                Finding(
                    kind="vanishing",
                    source="depth",
                    step=s,
                    layer=first,
                    value=v,
                    threshold=self.depth_ratio,
                    severity="warning",
                    message=(
                        f"Vanishing gradients along depth at step {s}: the earliest layers (from "
                        f"{first}) get {_fmt(v)}x the gradient RMS of the latest layers "
                        f"(threshold {_fmt(self.depth_ratio)})."
                    ),
                    layers=(first,),
                )
            )
        for source, what in (("zero", "an exactly zero gradient"), ("ratio", "a gradient-to-weight ratio")):
            hits = fired[source]
            if not hits:
                continue
            i, s, v = min(hits, key=lambda h: (h[1], h[0]))
            layers = tuple(names[j] for j, _, _ in sorted(hits))
            more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
            if source == "zero":
                msg = f"Vanishing gradients at step {s}: {names[i]}{more} received {what} for {self.persist} steps."
                thr = 0.0
            else:
                msg = (
                    f"Vanishing gradients at step {s}: {names[i]}{more} has {what} of {_fmt(v)}, below "
                    f"{_fmt(self.min_ratio)} (updates smaller than float32 can represent)."
                )
                thr = self.min_ratio
            out.append(Finding("vanishing", source, s, names[i], v, thr, "warning", msg, layers))
        return out


class Exploding(_PersistentLayerDetector):
    """Gradients large enough to destroy the weights they update.

    Checks (each must hold for ``persist`` consecutive steps):

    * ``depth``: the earliest weight layers' gradient RMS exceeds ``depth_ratio`` times the latest
      layers'. Default 1e5: healthy nets stay below ~1e2; deep plain BatchNorm stacks grow toward
      the input at init (Yang et al. 2019: ~3e4 at depth 56), so the default sits above that.
    * ``ratio``: a layer's gradient norm exceeds ``max_ratio`` times its weight norm. Default 50:
      healthy layers stay below ~2; oversized init and exploding recurrences give 1e4 and more.
      Layers with zero-initialised weights are excluded.
    * ``total``: the same ratio for the whole model (total gradient norm over total weight norm).
    * ``growth``: the total gradient norm exceeds ``growth`` times its level over the first
      ``growth_warmup`` steps (geometric mean). Default 1e4: a divergence in which gradients and
      weights grow together keeps ||g||/||w|| flat and grows ~1.4x per step without ever looking
      like a spike (a linear model under SGD at 6x its stable learning rate: 0.9 -> 3e6 in 90
      steps); healthy runs' norms drift by a few x, and fall rather than rise as training
      converges. Four orders of magnitude leave a wide margin.

    Args:
        depth_ratio: threshold on early/late gradient RMS.
        max_ratio: threshold on ||g|| / ||w||.
        growth: threshold on the total norm over its early level.
        growth_warmup: steps whose norms set the early level.
        persist: consecutive steps a condition must hold.
    """

    sources = (("depth", False), ("ratio", True), ("total", False), ("growth", False))

    def __init__(
        self,
        depth_ratio: float = 1e5,
        max_ratio: float = 50.0,
        growth: float = 1e4,
        growth_warmup: int = 20,
        persist: int = 3,
    ) -> None:
        super().__init__(persist)
        self.depth_ratio = check_positive("depth_ratio", depth_ratio)
        self.max_ratio = check_positive("max_ratio", max_ratio)
        self.growth = check_positive("growth", growth)
        if self.growth <= 1:
            raise ValueError(f"`growth` must be > 1; got {growth!r}")
        self.growth_warmup = check_int("growth_warmup", growth_warmup, 1)
        self._param_norm: Tensor | None = None
        self._weight_cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self._profile = _DepthProfile(ctx)
        self._ref_sum = torch.zeros((), device=ctx.device)
        self._ref_count = torch.zeros((), device=ctx.device)

    def _update_growth(self, total: Tensor, step_t: Tensor) -> None:
        usable = torch.isfinite(total) & (total > 0)
        x = total.clamp_min(_TINY).log()
        ready = self._ref_count >= self.growth_warmup
        excess = x - self._ref_sum / self._ref_count.clamp_min(1)
        cond = (usable & ready & (excess > math.log(self.growth))).reshape(1)
        self._track["growth"].update(cond, excess.exp().reshape(1), step_t)
        learn = usable & ~ready
        self._ref_sum = torch.where(learn, self._ref_sum + x, self._ref_sum)
        self._ref_count = self._ref_count + learn.to(self._ref_count.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "growth_ref": {"sum": self._ref_sum, "count": self._ref_count}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        ref = state.get("growth_ref")
        if ref is not None:
            self._ref_sum = ref["sum"].to(self._ref_sum.device)
            self._ref_count = ref["count"].to(self._ref_count.device)

    def update(self, stats: GradStats, step_t: Tensor, activations: ActivationStats | None) -> None:
        assert self.ctx is not None
        if stats.param_norm is not None:
            self._param_norm = stats.param_norm
        finite = torch.isfinite(stats.total_norm).reshape(1)
        self._update_growth(stats.total_norm, step_t)
        if self._profile.enabled:
            log_r, ok = self._profile.log_ratio(stats, self.ctx.numel)
            cond = ok & (log_r > math.log(self.depth_ratio))
            self._track["depth"].update(cond, log_r.exp(), step_t)
        if self._param_norm is not None:
            ratio, valid = _relative_to_weights(stats, self._param_norm, self.ctx.numel)
            cond = valid & (ratio > self.max_ratio) & torch.isfinite(ratio)
            self._track["ratio"].update(cond, ratio, step_t)
            pn_safe, pn_pos = self._weight_total(stats.present)
            total = (stats.total_norm / pn_safe).reshape(1)
            cond = finite & pn_pos & (total > self.max_ratio)
            self._track["total"].update(cond, total, step_t)

    def _weight_total(self, present: Tensor) -> tuple[Tensor, Tensor]:
        """Total weight norm over the present layers (floored) and whether it is > 0.

        Weight norms change only at logging steps and the present-mask only when the set of
        gradients does, so this is cached on the identity of both (the cache holds them alive).
        """
        c = self._weight_cache
        if c is None or c[0] is not self._param_norm or c[1] is not present:
            assert self._param_norm is not None
            pn = (self._param_norm * present).square().sum().sqrt()
            c = self._weight_cache = (self._param_norm, present, pn.clamp_min(_TINY), (pn > 0).reshape(1))
        return c[2], c[3]

    def collect(self, values: list[list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        names = self.ctx.names
        fired = self._collect_fired(values)
        out: list[Finding] = []
        for _, s, v in fired["depth"]:
            first = names[self._profile.first_layer]
            out.append(
                Finding(
                    "exploding",
                    "depth",
                    s,
                    first,
                    v,
                    self.depth_ratio,
                    "warning",
                    f"Exploding gradients along depth at step {s}: the earliest layers (from {first}) get "
                    f"{_fmt(v)}x the gradient RMS of the latest layers (threshold {_fmt(self.depth_ratio)}).",
                    (first,),
                )
            )
        hits = fired["ratio"]
        if hits:
            i, s, v = max(hits, key=lambda h: h[2])
            layers = tuple(names[j] for j, _, _ in sorted(hits, key=lambda h: -h[2]))
            more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
            out.append(
                Finding(
                    "exploding",
                    "ratio",
                    min(h[1] for h in hits),
                    names[i],
                    v,
                    self.max_ratio,
                    "warning",
                    f"Exploding gradients at step {s}: {names[i]}{more} has a gradient {_fmt(v)}x its "
                    f"weight norm (threshold {_fmt(self.max_ratio)}).",
                    layers,
                )
            )
        for _, s, v in fired["growth"]:
            out.append(
                Finding(
                    "exploding",
                    "growth",
                    s,
                    None,
                    v,
                    self.growth,
                    "warning",
                    f"Exploding gradients at step {s}: the total gradient norm has grown to {_fmt(v)}x its level "
                    f"over the first {self.growth_warmup} steps (threshold {_fmt(self.growth)}).",
                )
            )
        for _, s, v in fired["total"]:
            if hits:
                continue  # the per-layer finding already says it, with the layer
            out.append(
                Finding(
                    "exploding",
                    "total",
                    s,
                    None,
                    v,
                    self.max_ratio,
                    "warning",
                    f"Exploding gradients at step {s}: the total gradient norm is {_fmt(v)}x the total "
                    f"weight norm (threshold {_fmt(self.max_ratio)}).",
                )
            )
        return out


class Spike:
    """A sudden jump of the total gradient norm against its own recent history.

    Keeps an EMA of the log total norm and of its variance on the device. After ``warmup``
    steps, a step is a spike when its log-norm is more than ``z_thresh`` standard deviations
    above the mean *and* the norm is more than ``min_factor`` times the running geometric mean.
    Defaults (6 sigma, 10x) sit well above healthy fluctuation (2-3x, z up to ~4 early in an Adam
    run) and match large-run practice (6 sigma, OLMo-core). Spikes do not enter the EMA at full
    size (the update is winsorised at 3 sigma), so one spike does not hide the next.

    Args:
        alpha: EMA decay per step (0.95 is a ~20-step memory).
        z_thresh: z-score threshold on the log-norm.
        min_factor: the norm must also exceed this multiple of its running geometric mean.
        warmup: steps before the detector may fire.
    """

    def __init__(self, alpha: float = 0.95, z_thresh: float = 6.0, min_factor: float = 10.0, warmup: int = 20) -> None:
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.z_thresh = check_positive("z_thresh", z_thresh)
        self.min_factor = check_positive("min_factor", min_factor)
        if self.min_factor <= 1:
            raise ValueError(f"`min_factor` must be > 1; got {min_factor!r}")
        self.warmup = check_int("warmup", warmup, 1)

    def bind(self, ctx: DetectorContext) -> None:
        dev = ctx.device
        self.mean = torch.zeros((), device=dev)
        self.var = torch.zeros((), device=dev)
        self.count = torch.zeros((), device=dev)
        self.fired_step = torch.full((1,), -1.0, device=dev)
        self.fired_value = torch.zeros(1, device=dev)
        self._alpha = torch.tensor(self.alpha, device=dev)

    def update(self, stats: GradStats, step_t: Tensor, activations: ActivationStats | None) -> None:
        n = stats.total_norm
        usable = torch.isfinite(n) & (n > 0)
        x = n.clamp_min(_TINY).log()
        # 0.1 in log units (10%) floors the spread so a very steady norm does not make noise a spike.
        std = (self.var + 0.01).sqrt()
        excess = x - self.mean
        warm = self.count >= self.warmup
        spike = usable & warm & (excess > self.z_thresh * std) & (excess > math.log(self.min_factor))
        take = spike.reshape(1) & (self.fired_step < 0)
        self.fired_step = torch.where(take, step_t, self.fired_step)
        self.fired_value = torch.where(take, excess.exp().reshape(1), self.fired_value)
        # Running mean: cumulative average during warm-up, EMA after; winsorised at 3 sigma.
        a = torch.where(warm, self._alpha, self.count / (self.count + 1))
        xw = torch.where(warm, torch.minimum(x, self.mean + 3 * std), x)
        new_mean = a * self.mean + (1 - a) * xw
        new_var = a * self.var + (1 - a) * (xw - self.mean) * (xw - new_mean)
        self.mean = torch.where(usable, new_mean, self.mean)
        self.var = torch.where(usable, new_var.clamp_min(0), self.var)
        self.count = self.count + usable.to(self.count.dtype)

    def pending(self) -> list[Tensor]:
        return [self.fired_step, self.fired_value, self.mean.exp().reshape(1)]

    def collect(self, values: list[list[float]], step: int) -> list[Finding]:
        self.fired_step = torch.full_like(self.fired_step, -1.0)
        s, v = int(values[0][0]), values[1][0]
        if s < 0:
            return []
        typical = values[2][0]
        return [
            Finding(
                "spike",
                "total",
                s,
                None,
                v,
                self.min_factor,
                "warning",
                f"Gradient spike at step {s}: the total norm jumped to {_fmt(v)}x its running mean "
                f"({_fmt(v * typical)} vs {_fmt(typical)}).",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.mean.device
        self.mean, self.var, self.count = (state[k].to(dev) for k in ("mean", "var", "count"))


class NonFinite:
    """NaN or Inf in any gradient; reports the layers, in backward order (where they appear first)."""

    def bind(self, ctx: DetectorContext) -> None:
        self.ctx = ctx
        n = len(ctx.layers)
        self.fired_step = torch.full((1,), -1.0, device=ctx.device)
        self.fired_layers = torch.zeros(n, device=ctx.device)

    def update(self, stats: GradStats, step_t: Tensor, activations: ActivationStats | None) -> None:
        take = stats.any_nonfinite.reshape(1) & (self.fired_step < 0)
        self.fired_step = torch.where(take, step_t, self.fired_step)
        self.fired_layers = torch.where(take, stats.nonfinite.to(torch.float32), self.fired_layers)

    def pending(self) -> list[Tensor]:
        return [self.fired_step, self.fired_layers]

    def collect(self, values: list[list[float]], step: int) -> list[Finding]:
        self.fired_step = torch.full_like(self.fired_step, -1.0)
        s = int(values[0][0])
        if s < 0:
            return []
        names = self.ctx.names
        layers = tuple(names[i] for i in reversed(range(len(names))) if values[1][i] > 0)
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        return [
            Finding(
                "nonfinite",
                "grad",
                s,
                layers[0] if layers else None,
                float(len(layers)),
                0.0,
                "error",
                f"Non-finite gradients (NaN/Inf) at step {s} in {len(layers)} layer(s), first in "
                f"backward order: {shown}.",
                layers,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class _ActivationDetector(_PersistentLayerDetector):
    sources = (("act", True),)
    kind = ""
    stat = ""  # attribute of ActivationStats that holds the fraction
    wanted: tuple[str, ...] = ()
    template = ""  # message, formatted with where, step, value

    def __init__(self, threshold: float, persist: int) -> None:
        super().__init__(persist)
        self.threshold = check_range("threshold", threshold, 0.0, 1.0)

    def bind(self, ctx: DetectorContext) -> None:
        self.ctx = ctx
        n = len(ctx.activation_names)
        self._track = {"act": Persistence(n, ctx.device, self.persist)}
        mask = [k in self.wanted and not ex for k, ex in zip(ctx.activation_kinds, ctx.excluded_activations)]
        self._mask = torch.tensor(mask, dtype=torch.bool, device=ctx.device)

    def update(self, stats: GradStats, step_t: Tensor, activations: ActivationStats | None) -> None:
        if activations is None or not len(self._mask):
            return
        frac = getattr(activations, self.stat)
        cond = self._mask & activations.seen & (frac > self.threshold)
        self._track["act"].update(cond, frac, step_t)

    def pending(self) -> list[Tensor]:
        return self._track["act"].pending() if self._track else []

    def collect(self, values: list[list[float]], step: int) -> list[Finding]:
        if not values:
            return []
        assert self.ctx is not None
        hits = _fired(values)
        self._track["act"].clear()
        if not hits:
            return []
        names = self.ctx.activation_names
        i, s, v = max(hits, key=lambda h: h[2])
        layers = tuple(names[j] for j, _, _ in sorted(hits, key=lambda h: -h[2]))
        more = f" (and {len(layers) - 1} more)" if len(layers) > 1 else ""
        return [Finding(self.kind, "act", min(h[1] for h in hits), names[i], v, self.threshold, "warning",
                        self.template.format(where=names[i] + more, step=s, value=v), layers)]


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


class TimeVanishing:
    """Vanishing gradients across *time* in recurrent modules (needs ``track_time=True``).

    Reads the temporal profile (:mod:`gradwatch.temporal`): the ratio of the loss gradient's norm
    with respect to the recurrent module's input at the first time step to that at the last. Its
    logarithm is averaged over the profiled (logging) steps with an EMA (``alpha``), so one lucky
    batch neither raises nor hides the alert; after ``warmup`` profiles the alert fires when the
    average ratio is below ``min_ratio``.

    Default 1e-8, from float32: a recurrent layer's weight gradient is a sum over time steps, and
    a first-step contribution below float32's resolution (1.2e-7) of the last step's is rounded
    away, so nothing the sequence's start contains can move the weights. A vanilla tanh RNN at
    50-100 steps sits at 1e-10..1e-20 (0 when it underflows); an LSTM that learned a 50-step copy
    task stays near 1 (measured, see the reference scenario ``recurrence``). An LSTM that has not
    learned a long-memory task may legitimately sit below it too: the alert then says truthfully
    that its gradient does not reach the sequence's start.

    Args:
        min_ratio: threshold on the first/last time-step gradient ratio.
        alpha: EMA decay per profiled step for the log-ratio.
        warmup: profiled steps before the detector may fire.
    """

    def __init__(self, min_ratio: float = 1e-8, alpha: float = 0.7, warmup: int = 3) -> None:
        self.min_ratio = check_range("min_ratio", min_ratio, 0.0, 1.0)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.warmup = check_int("warmup", warmup, 1)
        self.names: list[str] = []

    def bind(self, ctx: DetectorContext) -> None:
        self.names = list(ctx.time_layers)
        n = len(self.names)
        dev = ctx.device
        self.ema = torch.zeros(n, device=dev)
        self.count = torch.zeros(n, device=dev)
        self.fired_step = torch.full((n,), -1.0, device=dev)
        self.fired_value = torch.zeros(n, device=dev)
        self.fired_decay = torch.zeros(n, device=dev)
        self._decay = torch.zeros(n, device=dev)

    def update(self, stats: GradStats, step_t: Tensor, activations: ActivationStats | None) -> None:
        return None  # the per-layer statistics say nothing about time; see update_time

    def update_time(self, profile: Any, step_t: Tensor) -> None:
        """Fold one step's :class:`~gradwatch.temporal.TimeProfile` in (device only)."""
        if not self.names:
            return
        seen = profile.seen.to(self.ema.device)
        x = profile.log_ratio.to(self.ema.device)
        a = torch.where(self.count > 0, torch.full_like(self.ema, self.alpha), torch.zeros_like(self.ema))
        self.ema = torch.where(seen, a * self.ema + (1 - a) * x, self.ema)
        self._decay = torch.where(seen, profile.log_decay.to(self.ema.device), self._decay)
        self.count = self.count + seen.to(self.count.dtype)
        cond = seen & (self.count >= self.warmup) & (self.ema < math.log(self.min_ratio))
        take = cond & (self.fired_step < 0)
        self.fired_step = torch.where(take, step_t, self.fired_step)
        self.fired_value = torch.where(take, self.ema.exp(), self.fired_value)
        self.fired_decay = torch.where(take, self._decay.exp(), self.fired_decay)

    def pending(self) -> list[Tensor]:
        return [self.fired_step, self.fired_value, self.fired_decay] if self.names else []

    def collect(self, values: list[list[float]], step: int) -> list[Finding]:
        if not values:
            return []
        self.fired_step = torch.full_like(self.fired_step, -1.0)
        out: list[Finding] = []
        for i, (s, v, d) in enumerate(zip(*values[:3])):
            if s < 0:
                continue
            name = self.names[i]
            out.append(
                Finding(
                    "vanishing",
                    f"time:{name}",
                    int(s),
                    name,
                    v,
                    self.min_ratio,
                    "warning",
                    f"Vanishing gradients across time at step {int(s)}: in {name} the first time step gets "
                    f"{_fmt(v)}x the gradient of the last (threshold {_fmt(self.min_ratio)}; each step back "
                    f"keeps {_fmt(d)} of it), so the sequence's start cannot influence the weights.",
                    (name,),
                )
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema" in state and len(state["ema"]) == len(self.names):
            self.ema = state["ema"].to(self.ema.device)
            self.count = state["count"].to(self.count.device)


def default_detectors() -> list[Detector]:
    """The built-in detectors with their calibrated defaults."""
    return [NonFinite(), Spike(), Vanishing(), Exploding(), Dead(), Saturated(), TimeVanishing()]
