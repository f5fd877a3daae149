"""Vanishing and exploding gradients along depth and relative to the weights.

Each default threshold is chosen from the physics of the failure, with a wide margin to what
healthy training shows (figures measured on CPU with torch 2.13; see docs/DESIGN.md):

* healthy networks (He-init ReLU, Xavier tanh, pre-LN transformers, BN ResNets) keep the ratio of
  the earliest to the latest layers' gradient RMS within ~1e-2..1e2; a sigmoid stack reaches
  1e-17, default-init deep ReLU 1e-7;
* healthy per-layer gradient-to-weight norm ratios stay below ~2; oversized init or exploding
  recurrences give 1e4 and more.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_positive, check_range
from gradwatch.detectors._common import PersistentChecks, fmt
from gradwatch.detectors.base import TINY, DetectorContext, Finding, StepEvidence

__all__ = ["Exploding", "Vanishing"]

# Weights whose RMS is below this are treated as deliberately zero-initialised (LoRA's B,
# zero-init residual branches, zero-init heads): a gradient-to-weight ratio means nothing there.
_ZERO_WEIGHT_RMS = 1e-6


def relative_to_weights(ev: StepEvidence, param_norm: Tensor, numel: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient-to-weight norm ratio per layer and where it is meaningful (computed once per step)."""
    stats = ev.stats

    def make() -> tuple[Tensor, Tensor]:
        # A non-finite weight norm (weights already overflowed) would give a ratio of 0: not vanishing.
        valid = stats.present & (param_norm > _ZERO_WEIGHT_RMS * numel.sqrt()) & torch.isfinite(param_norm)
        ratio = stats.grad_norm / param_norm.clamp_min(TINY)
        return ratio, valid

    # Keyed by identity: both tensors stay alive (held by the detectors and the context) while the
    # evidence lives, so an id cannot be reused within the cache's lifetime.
    return ev.derived(("relative", id(param_norm), id(numel)), make)


class DepthProfile:
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

    def log_ratio(self, ev: StepEvidence, numel: Tensor) -> tuple[Tensor, Tensor]:
        """log(early RMS / late RMS) and whether both groups had usable layers (computed once per step)."""
        return ev.derived((*self._key, id(numel)), lambda: self._log_ratio(ev, numel))

    def _log_ratio(self, ev: StepEvidence, numel: Tensor) -> tuple[Tensor, Tensor]:
        stats = ev.stats
        rms = stats.grad_norm / numel.sqrt()
        usable = stats.present & (rms > 0) & torch.isfinite(rms)
        logs = torch.where(usable, rms.clamp_min(TINY).log(), torch.zeros_like(rms))
        e = self.early & usable
        l_ = self.late & usable
        ne, nl = e.sum(), l_.sum()
        mean_e = (logs * e).sum() / ne.clamp_min(1)
        mean_l = (logs * l_).sum() / nl.clamp_min(1)
        return (mean_e - mean_l).reshape(1), ((ne > 0) & (nl > 0)).reshape(1)


class Vanishing(PersistentChecks):
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
        self._profile = DepthProfile(ctx)
        self._weight = torch.zeros(len(ctx.layers), dtype=torch.bool, device=ctx.device)
        self._weight[ctx.weight_layers] = True
        self.state.bind(ctx.device)

    def update(self, ev: StepEvidence) -> None:
        assert self.ctx is not None
        stats = ev.stats
        if stats.param_norm is not None:
            self._param_norm = stats.param_norm
        if self._profile.enabled:
            log_r, ok = self._profile.log_ratio(ev, self.ctx.numel)
            cond = ok & (log_r < math.log(self.depth_ratio))
            self.checks["depth"].update(cond, log_r.exp(), ev.step)
        zero = stats.present & self._weight & (stats.grad_norm == 0)
        self.checks["zero"].update(zero, stats.grad_norm, ev.step)
        if self._param_norm is not None:
            ratio, valid = relative_to_weights(ev, self._param_norm, self.ctx.numel)
            cond = valid & self._weight & (ratio < self.min_ratio) & (stats.grad_norm > 0)
            self.checks["ratio"].update(cond, ratio, ev.step)

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        names = self.ctx.names
        fired = self.fired_by_source(values)
        out: list[Finding] = []
        for f in fired["depth"]:
            first = names[self._profile.first_layer]
            out.append(
                Finding(
                    kind="vanishing",
                    source="depth",
                    step=f.step,
                    layer=first,
                    value=f.value,
                    threshold=self.depth_ratio,
                    severity="warning",
                    message=(
                        f"Vanishing gradients along depth at step {f.step}: the earliest layers (from "
                        f"{first}) get {fmt(f.value)}x the gradient RMS of the latest layers "
                        f"(threshold {fmt(self.depth_ratio)})."
                    ),
                    layers=(first,),
                )
            )
        for source, what in (("zero", "an exactly zero gradient"), ("ratio", "a gradient-to-weight ratio")):
            hits = fired[source]
            if not hits:
                continue
            h = min(hits, key=lambda h: (h.step, h.index))
            i, s, v = h.index, h.step, h.value
            layers = tuple(names[x.index] for x in sorted(hits))
            more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
            if source == "zero":
                msg = f"Vanishing gradients at step {s}: {names[i]}{more} received {what} for {self.persist} steps."
                thr = 0.0
            else:
                msg = (
                    f"Vanishing gradients at step {s}: {names[i]}{more} has {what} of {fmt(v)}, below "
                    f"{fmt(self.min_ratio)} (updates smaller than float32 can represent)."
                )
                thr = self.min_ratio
            out.append(Finding("vanishing", source, s, names[i], v, thr, "warning", msg, layers))
        return out


class Exploding(PersistentChecks):
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
        self._profile = DepthProfile(ctx)
        # Sum and count of the log total norms of the first growth_warmup usable steps.
        self.state.add_state("growth_ref.sum", lambda dev: torch.zeros((), device=dev))
        self.state.add_state("growth_ref.count", lambda dev: torch.zeros((), device=dev))
        self.state.bind(ctx.device)

    def _update_growth(self, total: Tensor, step: Tensor) -> None:
        st = self.state
        ref_sum, ref_count = st["growth_ref.sum"], st["growth_ref.count"]
        usable = torch.isfinite(total) & (total > 0)
        x = total.clamp_min(TINY).log()
        ready = ref_count >= self.growth_warmup
        excess = x - ref_sum / ref_count.clamp_min(1)
        cond = (usable & ready & (excess > math.log(self.growth))).reshape(1)
        self.checks["growth"].update(cond, excess.exp().reshape(1), step)
        learn = usable & ~ready
        st["growth_ref.sum"] = torch.where(learn, ref_sum + x, ref_sum)
        st["growth_ref.count"] = ref_count + learn.to(ref_count.dtype)

    def update(self, ev: StepEvidence) -> None:
        assert self.ctx is not None
        stats = ev.stats
        if stats.param_norm is not None:
            self._param_norm = stats.param_norm
        finite = torch.isfinite(stats.total_norm).reshape(1)
        self._update_growth(stats.total_norm, ev.step)
        if self._profile.enabled:
            log_r, ok = self._profile.log_ratio(ev, self.ctx.numel)
            cond = ok & (log_r > math.log(self.depth_ratio))
            self.checks["depth"].update(cond, log_r.exp(), ev.step)
        if self._param_norm is not None:
            ratio, valid = relative_to_weights(ev, self._param_norm, self.ctx.numel)
            cond = valid & (ratio > self.max_ratio) & torch.isfinite(ratio)
            self.checks["ratio"].update(cond, ratio, ev.step)
            pn_safe, pn_pos = self._weight_total(stats.present)
            total = (stats.total_norm / pn_safe).reshape(1)
            cond = finite & pn_pos & (total > self.max_ratio)
            self.checks["total"].update(cond, total, ev.step)

    def _weight_total(self, present: Tensor) -> tuple[Tensor, Tensor]:
        """Total weight norm over the present layers (floored) and whether it is > 0.

        Weight norms change only at logging steps and the present-mask only when the set of
        gradients does, so this is cached on the identity of both (the cache holds them alive).
        """
        c = self._weight_cache
        if c is None or c[0] is not self._param_norm or c[1] is not present:
            assert self._param_norm is not None
            pn = (self._param_norm * present).square().sum().sqrt()
            c = self._weight_cache = (self._param_norm, present, pn.clamp_min(TINY), (pn > 0).reshape(1))
        return c[2], c[3]

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        names = self.ctx.names
        fired = self.fired_by_source(values)
        out: list[Finding] = []
        for f in fired["depth"]:
            first = names[self._profile.first_layer]
            out.append(
                Finding(
                    "exploding",
                    "depth",
                    f.step,
                    first,
                    f.value,
                    self.depth_ratio,
                    "warning",
                    f"Exploding gradients along depth at step {f.step}: the earliest layers (from {first}) get "
                    f"{fmt(f.value)}x the gradient RMS of the latest layers (threshold {fmt(self.depth_ratio)}).",
                    (first,),
                )
            )
        hits = fired["ratio"]
        if hits:
            top = max(hits, key=lambda h: h.value)
            layers = tuple(names[h.index] for h in sorted(hits, key=lambda h: -h.value))
            more = f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""
            out.append(
                Finding(
                    "exploding",
                    "ratio",
                    min(h.step for h in hits),
                    names[top.index],
                    top.value,
                    self.max_ratio,
                    "warning",
                    f"Exploding gradients at step {top.step}: {names[top.index]}{more} has a gradient "
                    f"{fmt(top.value)}x its weight norm (threshold {fmt(self.max_ratio)}).",
                    layers,
                )
            )
        for f in fired["growth"]:
            out.append(
                Finding(
                    "exploding",
                    "growth",
                    f.step,
                    None,
                    f.value,
                    self.growth,
                    "warning",
                    f"Exploding gradients at step {f.step}: the total gradient norm has grown to {fmt(f.value)}x its "
                    f"level over the first {self.growth_warmup} steps (threshold {fmt(self.growth)}).",
                )
            )
        for f in fired["total"]:
            if hits:
                continue  # the per-layer finding already says it, with the layer
            out.append(
                Finding(
                    "exploding",
                    "total",
                    f.step,
                    None,
                    f.value,
                    self.max_ratio,
                    "warning",
                    f"Exploding gradients at step {f.step}: the total gradient norm is {fmt(f.value)}x the total "
                    f"weight norm (threshold {fmt(self.max_ratio)}).",
                )
            )
        return out
