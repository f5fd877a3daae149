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
from typing import Any

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_positive, check_range
from gradwatch.detectors._common import GradWindow, WindowedChecks, fmt, grad_window
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


def relative_to_weights(rows: list[StepEvidence], win: GradWindow, param_norm: Tensor, floor: Tensor) -> Tensor:
    """Gradient-to-weight norm ratio per step and layer ``[T, L]``, NaN where it means nothing.

    It means something where the layer has a finite, non-zero gradient and a finite weight norm above
    ``floor`` (``_ZERO_WEIGHT_RMS`` times the root of its element count: deliberately zero weights give
    a ratio that means nothing; a non-finite weight norm, weights already overflowed, would give 0).
    Computed once per window for every detector that asks (Vanishing and Exploding both do: ``floor``,
    a function of the context's element counts, is the same for both); every comparison with a NaN is
    False, so the conditions need no mask of their own.
    """

    def make() -> Tensor:
        valid = win.usable & (param_norm > floor) & (param_norm < math.inf)
        return torch.where(valid, win.norm / param_norm.clamp_min(TINY), math.nan)

    return rows[-1].derived(("window", "relative", id(rows[0]), len(rows), id(param_norm)), make)


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
        # Row 0: the earliest quarter; row 1: the latest (disjoint: 2k <= len(w) / 2).
        self.groups = torch.zeros(2, n, dtype=torch.bool, device=ctx.device)
        if self.enabled:
            self.groups[0, w[:k]] = True
            self.groups[1, w[-k:]] = True
        self._sign = torch.tensor([1.0, -1.0], device=ctx.device)  # early minus late
        self._sqrt_numel = ctx.numel.sqrt()
        self.first_layer = w[0] if w else 0
        self._key = ("depth", tuple(w[:k]), tuple(w[-k:]), n)

    def log_ratio(self, rows: list[StepEvidence], win: GradWindow) -> Tensor:
        """Per step ``[T]``: log(early RMS / late RMS); NaN where a group has no usable layer."""
        key = ("window", *self._key, id(rows[0]), len(rows))
        return rows[-1].derived(key, lambda: self._log_ratio(win))

    def ratio(self, rows: list[StepEvidence], win: GradWindow) -> Tensor:
        """Per step ``[T]``: early RMS / late RMS (``exp`` of :meth:`log_ratio`)."""
        key = ("window", *self._key, "exp", id(rows[0]), len(rows))
        return rows[-1].derived(key, lambda: self.log_ratio(rows, win).exp())

    def _log_ratio(self, win: GradWindow) -> Tensor:
        log_rms = (win.norm / self._sqrt_numel).clamp_min(TINY).log()
        pick = win.usable.unsqueeze(-2) & self.groups  # [T, 2, L]: the usable layers of each group
        count = pick.sum(-1)
        mean = torch.where(pick, log_rms.unsqueeze(-2), 0.0).sum(-1) / count.clamp_min(1)
        return torch.where(count.amin(-1) > 0, (mean * self._sign).sum(-1), math.nan)


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
        self._floor = _ZERO_WEIGHT_RMS * ctx.numel.sqrt()
        weight = torch.zeros(len(ctx.layers), dtype=torch.bool, device=ctx.device)
        weight[ctx.weight_layers] = True
        self._weight = weight
        # Per-layer thresholds with the weight-layer mask folded in (a NaN or -inf bound never holds).
        self._zero_at = torch.where(weight, 0.0, math.nan)  # grad_sq == _zero_at: an exact zero at a weight layer
        self._low_at = torch.where(weight, self.min_ratio, -math.inf)  # ratio < _low_at
        self._never = torch.zeros(1, dtype=torch.bool, device=ctx.device)  # a model-wide check that cannot hold
        self._nil = torch.zeros(1, device=ctx.device)
        relu = [k == "relu" and not ex for k, ex in zip(ctx.activation_kinds, ctx.excluded_activations)]
        self._relu = torch.tensor(relu, dtype=torch.bool, device=ctx.device) if any(relu) else None
        self._explained = False  # a dying-ReLU finding was made: later depth/ratio findings are its symptom
        self.state.bind(ctx.device)

    def _dying(self, rows: list[StepEvidence], depth: Tensor, low: Tensor) -> tuple[Tensor, Tensor]:
        """Per step ``[T]``: the vanishing is the ReLUs' being off (see the class docstring), and the product."""
        if self._relu is None or any(ev.activations is None or ev.activations.active is None for ev in rows):
            return self._never.expand(len(rows)), self._nil.expand(len(rows))
        active = stacked(rows, "act_active", lambda ev: ev.activations.active)  # type: ignore[union-attr]
        seen = stacked(rows, "act_seen", lambda ev: ev.activations.seen)  # type: ignore[union-attr]
        use = self._relu & seen
        log_gain = 0.5 * torch.where(use, (2 * active).clamp_min(TINY).log(), 0.0).sum(-1)
        symptom = depth | low.any(-1)
        return symptom & (log_gain <= 0.5 * math.log(self.depth_ratio)), log_gain.exp()

    def conditions(self, rows: list[StepEvidence], param_norm: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        assert self.ctx is not None
        win = grad_window(rows)
        if self._profile.enabled:
            depth = self._profile.log_ratio(rows, win) < math.log(self.depth_ratio)  # NaN (no usable layer): False
            depth_value = self._profile.ratio(rows, win)
        else:
            depth, depth_value = self._never.expand(len(rows)), self._nil.expand(len(rows))
        zero = (win.grad_sq == self._zero_at) & win.present
        if any(ev.unreached is not None for ev in rows):
            # A zero that backward never wrote (a stale, zeroed gradient) is no_gradient's, not vanishing.
            none = torch.zeros_like(self._weight)
            zero = zero & ~stacked(rows, "unreached", lambda ev: ev.unreached if ev.unreached is not None else none)
        # An exact zero that neither zero weights nor dead/saturated units explain (a constant 0 gate) is no_gradient's.
        blocked = blocked_zero(rows, win.grad_sq, win.present, self.ctx)
        if blocked is not None:
            zero = zero & ~blocked
        ratio = relative_to_weights(rows, win, param_norm, self._floor)
        low = ratio < self._low_at
        dying = self._dying(rows, depth, low)
        return [depth, zero, low, dying[0]], [depth_value, win.grad_sq, ratio, dying[1]]

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
        self._floor = _ZERO_WEIGHT_RMS * ctx.numel.sqrt()
        self._never = torch.zeros(1, dtype=torch.bool, device=ctx.device)
        self._nil = torch.zeros(1, device=ctx.device)
        self._warm_level: Tensor | None = None  # the early level, once read back complete (it moves no more)
        self._warm = False

    def readout(self) -> dict[str, Tensor]:
        out = super().readout()
        if not self._warm:  # until the early level is read back complete (then the growth check is cheaper)
            out["growth_ref.count"] = self.state["growth_ref.count"].reshape(1)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._warm, self._warm_level = False, None  # the loaded level is not read back yet

    def _growth(self, usable: Tensor, log_total: Tensor) -> tuple[Tensor, Tensor]:
        """Per step: whether the total norm is ``growth`` times its early level, and by how much.

        The early level is the geometric mean of the first ``growth_warmup`` usable total norms;
        the window's steps are folded at once: before step ``t`` the level has counted
        ``min(count0 + usable steps before t, growth_warmup)`` norms (``count0`` once it is full).
        Once the host has read the count back complete, the level is a constant (what the general
        form computes then, in fewer ops).
        """
        st = self.state
        ref_sum, ref_count = st["growth_ref.sum"], st["growth_ref.count"]
        if self._warm:
            if self._warm_level is None:
                self._warm_level = ref_sum / ref_count.clamp_min(1)
            excess = log_total - self._warm_level
            return usable & (excess > math.log(self.growth)), excess.exp()
        u = usable.to(torch.float32)
        count = torch.maximum(ref_count, (ref_count + (u.cumsum(0) - u)).clamp_max(self.growth_warmup))
        learn = usable & (count < self.growth_warmup)
        xl = torch.where(learn, log_total, 0.0)
        level_sum = ref_sum + (xl.cumsum(0) - xl)
        excess = log_total - level_sum / count.clamp_min(1)
        cond = usable & (count >= self.growth_warmup) & (excess > math.log(self.growth))
        st["growth_ref.sum"] = ref_sum + xl.sum()
        st["growth_ref.count"] = count[-1] + learn[-1].to(torch.float32)
        return cond, excess.exp()

    def conditions(self, rows: list[StepEvidence], param_norm: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        assert self.ctx is not None
        win = grad_window(rows)
        total, n = win.total, len(rows)
        below_inf = total < math.inf  # NaN: False
        usable = (total > 0) & below_inf
        log_total = total.clamp_min(TINY).log()
        grow, grow_value = self._growth(usable, log_total)
        far = math.log(_FAR)
        if self._profile.enabled:
            log_r = self._profile.log_ratio(rows, win)  # NaN (a group without usable layers) fails every test
            depth, depth_imm = log_r > math.log(self.depth_ratio), log_r > math.log(self.depth_ratio) + far
            depth_value = self._profile.ratio(rows, win)
        else:
            depth = depth_imm = self._never.expand(n)
            depth_value = self._nil.expand(n)
        ratio = relative_to_weights(rows, win, param_norm, self._floor)  # NaN where it means nothing
        high = ratio > self.max_ratio
        # Total weight norm over the present layers; NaN (no weight norm known yet) fails the test.
        pn = (param_norm * win.present).square().sum(-1).sqrt()
        whole = torch.where((pn > 0) & below_inf, total / pn.clamp_min(TINY), math.nan)
        over = whole > self.max_ratio
        overflow, rate = self._overflow(total, usable, below_inf, log_total, depth | high.any(-1) | over | grow)
        # Severity-scaled persistence: 1e4x past the threshold fires on the step it is seen.
        self._imm = [
            depth_imm,
            ratio > self.max_ratio * _FAR,
            whole > self.max_ratio * _FAR,
            self._never.expand(n),
            overflow,
        ]
        return [depth, high, over, grow, overflow], [depth_value, ratio, whole, grow_value, rate]

    def immediates(self, steps: int) -> list[Tensor] | None:
        imm, self._imm = self._imm, None
        return imm

    def _overflow(
        self, total: Tensor, finite: Tensor, below_inf: Tensor, log_total: Tensor, held: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per step: the explosion outruns the persistence (see the class docstring), and the growth rate.

        ``finite``: the total norm is finite and > 0; ``below_inf``: it is not Inf/NaN.
        """
        st = self.state
        last_rate = st["last.rate"]  # the rates into the two steps before the window
        if total.shape[0] == 1:  # one step (log_every=1): the previous step is the state itself
            prev, prev_held = st["last.total"], st["last.held"]
        else:
            prev = torch.cat([st["last.total"], total[:-1]])
            prev_held = torch.cat([st["last.held"], held[:-1]])
        prev_ok = (prev > 0) & (prev < math.inf)
        rate = torch.where(finite & prev_ok, total / prev.clamp_min(TINY), math.nan)  # NaN: unknown
        rates = torch.cat([last_rate, rate])
        prev_rate, prev2_rate = rates[1:-1], rates[:-2]
        # Growth, not an oscillation: >= 10x into the step before, and not falling the step before that
        # (a norm alternating between two branches' scales is not an explosion).
        growing = (prev_rate >= _FAST_GROWTH) & ~(prev2_rate < 1)
        # log(total) + persist * log(rate) >= log(float32 max): Inf within the persistence window at this rate
        # (a NaN rate, unknown, fails it; where rate <= 1 the first test fails).
        to_inf = (rate > 1) & (torch.add(log_total, rate.log(), alpha=self.persist) >= math.log(_F32_MAX))
        after_growth = ~below_inf & (growing | prev_held)
        st["last.total"] = total[-1:]
        st["last.rate"] = rates[-2:]
        st["last.held"] = held[-1:]
        return to_inf | after_growth, torch.where(finite, rate, prev_rate)

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        count = values.get("growth_ref.count")
        self._warm = self._warm or (count is not None and count[0] >= self.growth_warmup)
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
