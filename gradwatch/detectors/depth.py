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
from gradwatch.detectors._common import WindowedChecks, fmt
from gradwatch.detectors.base import TINY, DetectorContext, Finding, StepEvidence, stacked
from gradwatch.detectors.no_gradient import blocked_zero

__all__ = ["Exploding", "Vanishing"]

# Weights whose RMS is below this are treated as deliberately zero-initialised (LoRA's B,
# zero-init residual branches, zero-init heads): a gradient-to-weight ratio means nothing there.
_ZERO_WEIGHT_RMS = 1e-6
# Severity-scaled persistence: a condition 1e4x (four orders of magnitude) past its threshold fires at once.
_FAR = 1e4
# One step's growth of the total norm that no healthy run shows (healthy: < 3x per step, spikes aside).
_FAST_GROWTH = 10.0
_F32_MAX = 3.4e38


def relative_to_weights(
    rows: list[StepEvidence], grad_sq: Tensor, present: Tensor, param_norm: Tensor, numel: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradient-to-weight norm ratio per step and layer ``[T, L]`` and where it is meaningful.

    Computed once per window for every detector that asks (Vanishing and Exploding both do).
    """

    def make() -> tuple[Tensor, Tensor]:
        # A non-finite weight norm (weights already overflowed) would give a ratio of 0: not vanishing.
        valid = present & (param_norm > _ZERO_WEIGHT_RMS * numel.sqrt()) & torch.isfinite(param_norm)
        ratio = grad_sq.sqrt() / param_norm.clamp_min(TINY)
        return ratio, valid

    return rows[-1].derived(("window", "relative", id(rows[0]), len(rows), id(numel)), make)


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

    def log_ratio(
        self, rows: list[StepEvidence], grad_sq: Tensor, present: Tensor, numel: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per step ``[T]``: log(early RMS / late RMS) and whether both groups had usable layers."""
        key = ("window", *self._key, id(rows[0]), len(rows), id(numel))
        return rows[-1].derived(key, lambda: self._log_ratio(grad_sq, present, numel))

    def _log_ratio(self, grad_sq: Tensor, present: Tensor, numel: Tensor) -> tuple[Tensor, Tensor]:
        rms = grad_sq.sqrt() / numel.sqrt()
        usable = present & (rms > 0) & torch.isfinite(rms)
        logs = torch.where(usable, rms.clamp_min(TINY).log(), 0.0)
        e = self.early & usable
        l_ = self.late & usable
        ne, nl = e.sum(1), l_.sum(1)
        mean_e = (logs * e).sum(1) / ne.clamp_min(1)
        mean_l = (logs * l_).sum(1) / nl.clamp_min(1)
        return mean_e - mean_l, (ne > 0) & (nl > 0)


def window_stats(rows: list[StepEvidence]) -> tuple[Tensor, Tensor, Tensor]:
    """The window's per-layer squared norms ``[T, L]``, present-masks ``[T or 1, L]`` and total norms ``[T]``."""
    return (
        stacked(rows, "grad_sq", lambda ev: ev.stats.grad_sq),
        stacked(rows, "present", lambda ev: ev.stats.present),
        stacked(rows, "total_norm", lambda ev: ev.stats.total_norm),
    )


class Vanishing(WindowedChecks):
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

    Dying ReLUs (``track_activations=True``): a ReLU layer passes back ``sqrt(2 f)`` of the gradient
    (in norm, with He-scaled weights) when a fraction ``f`` of its outputs is on, per sample and unit;
    He init is derived for ``f = 1/2``. When ``depth`` or ``ratio`` holds on a step where the product of
    the tracked ReLU layers' ``sqrt(2 f)`` is at most ``sqrt(depth_ratio)`` (1e-2 by default: the units
    that are off alone cost the gradient at least half of the orders of magnitude that define vanishing),
    the units switching off are the cause: the finding is ``dead`` (source ``inactive``) instead of
    ``vanishing``, on the same step. Measured on 34-layer width-8 ReLU nets (Adam 1e-3): the product
    predicts the measured early/late gradient ratio within ~2x (2e-3 vs 2e-3, 3e-3 vs 2e-3) before a
    layer dies; weights at 0.3x the He scale with zero biases keep ``f`` ~ 1/2 (ReLU is scale-invariant),
    so an init that shrinks the signal stays ``vanishing``.

    Args:
        depth_ratio: threshold on early/late gradient RMS.
        min_ratio: threshold on ||g|| / ||w|| per layer.
        persist: consecutive steps a condition must hold.
    """

    sources = (("depth", False), ("zero", True), ("ratio", True), ("dying", False))

    def __init__(self, depth_ratio: float = 1e-4, min_ratio: float = 1e-8, persist: int = 3) -> None:
        super().__init__(persist)
        self.depth_ratio = check_range("depth_ratio", depth_ratio, 0.0, 1.0)
        self.min_ratio = check_range("min_ratio", min_ratio, 0.0, 1.0)

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self._profile = DepthProfile(ctx)
        self._weight = torch.zeros(len(ctx.layers), dtype=torch.bool, device=ctx.device)
        self._weight[ctx.weight_layers] = True
        relu = [k == "relu" and not ex for k, ex in zip(ctx.activation_kinds, ctx.excluded_activations)]
        self._relu = torch.tensor(relu, dtype=torch.bool, device=ctx.device) if any(relu) else None
        self._explained = False  # a dying-ReLU finding was made: later depth/ratio findings are its symptom
        self.state.bind(ctx.device)

    def _dying(self, rows: list[StepEvidence], symptom: Tensor) -> tuple[Tensor, Tensor]:
        """Per step ``[T]``: the vanishing is the ReLUs' being off (see the class docstring), and the product."""
        if self._relu is None or any(ev.activations is None or ev.activations.active is None for ev in rows):
            none = torch.zeros_like(symptom)
            return none, none.to(torch.float32)
        active = stacked(rows, "act_active", lambda ev: ev.activations.active)  # type: ignore[union-attr]
        seen = stacked(rows, "act_seen", lambda ev: ev.activations.seen)  # type: ignore[union-attr]
        use = self._relu & seen
        log_gain = 0.5 * torch.where(use, (2 * active).clamp_min(TINY).log(), 0.0).sum(-1)
        return symptom & (log_gain <= 0.5 * math.log(self.depth_ratio)), log_gain.exp()

    def conditions(self, rows: list[StepEvidence], param_norm: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        assert self.ctx is not None
        grad_sq, present, _ = window_stats(rows)
        numel = self.ctx.numel
        if self._profile.enabled:
            log_r, ok = self._profile.log_ratio(rows, grad_sq, present, numel)
            depth = (ok & (log_r < math.log(self.depth_ratio)), log_r.exp())
        else:
            none = torch.zeros(len(rows), dtype=torch.bool, device=grad_sq.device)
            depth = (none, none.to(torch.float32))
        zero = present & self._weight & (grad_sq == 0)
        if any(ev.unreached is not None for ev in rows):
            # A zero that backward never wrote (a stale, zeroed gradient) is no_gradient's, not vanishing.
            none = torch.zeros_like(self._weight)
            zero = zero & ~stacked(rows, "unreached", lambda ev: ev.unreached if ev.unreached is not None else none)
        # An exact zero that neither zero weights nor dead/saturated units explain (a constant 0 gate) is no_gradient's.
        zero = zero & ~blocked_zero(rows, grad_sq, present, self.ctx)
        ratio, valid = relative_to_weights(rows, grad_sq, present, param_norm, numel)
        low = valid & self._weight & (ratio < self.min_ratio) & (grad_sq > 0)
        dying = self._dying(rows, depth[0] | low.any(-1))
        return [depth[0], zero, low, dying[0]], [depth[1], grad_sq, ratio, dying[1]]

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        names = self.ctx.names
        fired = self.fired_by_source(values)
        out: list[Finding] = []
        for f in fired["dying"]:
            out.append(
                Finding(
                    "dead",
                    "inactive",
                    f.step,
                    None,
                    f.value,
                    math.sqrt(self.depth_ratio),
                    "warning",
                    f"Dying ReLUs at step {f.step}: the gradient vanishes along depth, and the ReLU units are on "
                    f"for so few samples that they alone cut it to {fmt(f.value)}x (a ReLU layer passes sqrt(2 f) "
                    "of the gradient when a fraction f of its outputs is on; He init assumes f = 1/2).",
                )
            )
        self._explained = self._explained or bool(out)
        if self._explained:  # the same symptom, explained: its vanishing findings are the dying units'
            fired["depth"], fired["ratio"] = [], []
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


class Exploding(WindowedChecks):
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
    * ``overflow``: the explosion outruns the persistence. It holds on a step whose total norm,
      growing at this step's rate, reaches float32's overflow (3.4e38) within ``persist`` steps, and
      on a non-finite step that follows fast growth (>= 10x in one step, the step before not falling:
      healthy norms move by less than 3x) or a step where another exploding condition held: that Inf
      is where the explosion ends, so ``exploding`` is raised no later than ``nonfinite``. Fires on
      the step it is seen.

    Severity-scaled persistence: ``depth``, ``ratio`` and ``total`` fire on the step they are seen when
    four orders of magnitude past their threshold (``ratio`` > 5e5 with the default: 2.5e5x what healthy
    layers show; one SGD step at any learning rate above 2e-6 then moves the weights by more than their
    own norm, so waiting for the streak only lets the explosion destroy the weights and reach Inf first).
    A transient of the size a spike shows (a loss x1e4 for one step gives ||g||/||w|| up to ~2e4) stays
    below it and keeps its streak, as does any borderline condition.

    Args:
        depth_ratio: threshold on early/late gradient RMS.
        max_ratio: threshold on ||g|| / ||w||.
        growth: threshold on the total norm over its early level.
        growth_warmup: steps whose norms set the early level.
        persist: consecutive steps a condition must hold.
    """

    sources = (("depth", False), ("ratio", True), ("total", False), ("growth", False), ("overflow", False))

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

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self._profile = DepthProfile(ctx)
        # Sum and count of the log total norms of the first growth_warmup usable steps.
        self.state.add_state("growth_ref.sum", lambda dev: torch.zeros((), device=dev))
        self.state.add_state("growth_ref.count", lambda dev: torch.zeros((), device=dev))
        # The last step of the previous window: its total norm, growth rate, and whether a check held.
        self.state.add_state("last.total", lambda dev: torch.full((1,), float("nan"), device=dev))
        self.state.add_state("last.rate", lambda dev: torch.full((2,), float("nan"), device=dev))  # t-2, t-1
        self.state.add_state("last.held", lambda dev: torch.zeros(1, dtype=torch.bool, device=dev))
        self.state.bind(ctx.device)
        self._imm: list[Tensor] | None = None

    def _growth(self, total: Tensor) -> tuple[Tensor, Tensor]:
        """Per step: whether the total norm is ``growth`` times its early level, and by how much.

        The early level is the geometric mean of the first ``growth_warmup`` usable total norms;
        the window's steps are folded at once: before step ``t`` the level has counted
        ``min(count0 + usable steps before t, growth_warmup)`` norms (``count0`` once it is full).
        """
        st = self.state
        ref_sum, ref_count = st["growth_ref.sum"], st["growth_ref.count"]
        usable = torch.isfinite(total) & (total > 0)
        x = total.clamp_min(TINY).log()
        u = usable.to(torch.float32)
        count = torch.maximum(ref_count, (ref_count + (u.cumsum(0) - u)).clamp_max(self.growth_warmup))
        learn = usable & (count < self.growth_warmup)
        xl = torch.where(learn, x, 0.0)
        level_sum = ref_sum + (xl.cumsum(0) - xl)
        excess = x - level_sum / count.clamp_min(1)
        cond = usable & (count >= self.growth_warmup) & (excess > math.log(self.growth))
        st["growth_ref.sum"] = ref_sum + xl.sum()
        st["growth_ref.count"] = count[-1] + learn[-1].to(torch.float32)
        return cond, excess.exp()

    def conditions(self, rows: list[StepEvidence], param_norm: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        assert self.ctx is not None
        grad_sq, present, total = window_stats(rows)
        numel = self.ctx.numel
        grow, grow_value = self._growth(total)
        if self._profile.enabled:
            log_r, ok = self._profile.log_ratio(rows, grad_sq, present, numel)
            depth = (ok & (log_r > math.log(self.depth_ratio)), log_r.exp())
        else:
            depth = (torch.zeros_like(grow), torch.zeros_like(grow_value))
        ratio, valid = relative_to_weights(rows, grad_sq, present, param_norm, numel)
        high = valid & (ratio > self.max_ratio) & torch.isfinite(ratio)
        # Total weight norm over the present layers; NaN (no weight norm known yet) fails the test.
        pn = (param_norm * present).square().sum(1).sqrt()
        whole = total / pn.clamp_min(TINY)
        over = torch.isfinite(total) & (pn > 0) & (whole > self.max_ratio)
        overflow, rate = self._overflow(total, depth[0] | high.any(-1) | over | grow)
        # Severity-scaled persistence: 1e4x past the threshold fires on the step it is seen.
        far = math.log(_FAR)
        self._imm = [
            depth[0] & (log_r > math.log(self.depth_ratio) + far) if self._profile.enabled else depth[0],
            high & (ratio > self.max_ratio * _FAR),
            over & (whole > self.max_ratio * _FAR),
            torch.zeros_like(grow),
            overflow,
        ]
        return [depth[0], high, over, grow, overflow], [depth[1], ratio, whole, grow_value, rate]

    def immediates(self, steps: int) -> list[Tensor] | None:
        imm, self._imm = self._imm, None
        return imm

    def _overflow(self, total: Tensor, held: Tensor) -> tuple[Tensor, Tensor]:
        """Per step: the explosion outruns the persistence (see the class docstring), and the growth rate."""
        st = self.state
        finite = torch.isfinite(total) & (total > 0)
        prev = torch.cat([st["last.total"], total[:-1]])
        prev_ok = torch.isfinite(prev) & (prev > 0)
        rate = torch.where(finite & prev_ok, total / prev.clamp_min(TINY), float("nan"))  # NaN: unknown
        rates = torch.cat([st["last.rate"], rate])
        prev_rate, prev2_rate = rates[1:-1], rates[:-2]
        prev_held = torch.cat([st["last.held"], held[:-1]])
        # Growth, not an oscillation: >= 10x into the step before, and not falling the step before that
        # (a norm alternating between two branches' scales is not an explosion).
        growing = (prev_rate >= _FAST_GROWTH) & ~(prev2_rate < 1)
        # log(total) + persist * log(rate) >= log(float32 max): Inf within the persistence window at this rate.
        to_inf = finite & (rate > 1) & (
            total.clamp_min(TINY).log() + self.persist * rate.clamp_min(1).log() >= math.log(_F32_MAX)
        )
        after_growth = ~torch.isfinite(total) & (growing | prev_held)
        st["last.total"] = total[-1:]
        st["last.rate"] = rates[-2:]
        st["last.held"] = held[-1:]
        return to_inf | after_growth, torch.where(finite, rate, prev_rate)

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
        for f in fired["overflow"]:
            how = (
                f"the total gradient norm grew {fmt(f.value)}x in one step, a rate that overflows float32 (Inf/NaN) "
                f"within {self.persist} steps or already has"
                if f.value >= _FAST_GROWTH
                else "the gradients, exploding at the step before, overflowed to Inf/NaN"
            )
            out.append(
                Finding(
                    "exploding",
                    "overflow",
                    f.step,
                    None,
                    f.value,
                    _FAST_GROWTH,
                    "error",
                    f"Exploding gradients at step {f.step}: {how}; too fast to wait for {self.persist} steps.",
                    evidence=(("prior_growth", f.value if f.value >= _FAST_GROWTH else _FAST_GROWTH),),
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
