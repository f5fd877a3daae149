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
from gradwatch.detectors._common import FigureRows, GradWindow, WindowedChecks, fmt, grad_window
from gradwatch.detectors.base import (
    TINY,
    DetectorContext,
    Finding,
    Fired,
    StepEvidence,
    _flatten,
    constant,
    stacked,
)
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
        return torch.where(valid, win.norm / param_norm.clamp_min(TINY), constant(math.nan, valid.device))

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
        # No floor before the log: only usable layers count (0 < grad_sq, so norm >= 3.7e-23, float32's smallest
        # square root), and norm / sqrt(numel) stays above TINY, where the floor was, for any layer under 1e15
        # elements; what the floor changed (a 0 norm) is masked out below.
        log_rms = (win.norm / self._sqrt_numel).log()
        pick = win.usable.unsqueeze(-2) & self.groups  # [T, 2, L]: the usable layers of each group
        count = pick.sum(-1)
        # 0 / 0 = NaN: a group without usable layers makes the step's ratio NaN.
        mean = torch.where(pick, log_rms.unsqueeze(-2), constant(0.0, log_rms.device)).sum(-1) / count
        return (mean * self._sign).sum(-1)


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

    # On the device, per layer: the zero and ratio checks. The model-wide checks (depth, dying) run on the host
    # (_HostChecks) over five figures per step read back at the logging step; state_dict keeps every check side
    # by side as before, in ``layout`` order.
    sources = (("zero", True), ("ratio", True))
    layout = ("depth", "zero", "ratio", "dying")

    def __init__(self, depth_ratio: float = 1e-4, min_ratio: float = 1e-8, persist: int = 3) -> None:
        super().__init__(persist)
        self.depth_ratio = check_range("depth_ratio", depth_ratio, 0.0, 1.0)
        self.min_ratio = check_range("min_ratio", min_ratio, 0.0, 1.0)
        # The device compares a float32 figure with a Python number rounded to float32: so does the host.
        self._depth_at = _f32(math.log(self.depth_ratio))
        self._dying_at = _f32(0.5 * math.log(self.depth_ratio))
        self._host = _HostChecks(2)  # depth, dying
        self._figures = FigureRows()  # per step: depth log ratio and ratio, a ratio check held, dying log gain, gain
        self._loaded: dict[str, Any] | None = None  # a state loaded before bind, as given

    def bind(self, ctx: DetectorContext) -> None:
        if self.state.bound:  # bound again (a new monitor): the host state starts over too
            self._host.reset()
        super().bind(ctx)
        self._figures = FigureRows()
        self._nan = torch.full((1,), math.nan, device=ctx.device)
        self._profile = DepthProfile(ctx)
        self._floor = _ZERO_WEIGHT_RMS * ctx.numel.sqrt()
        weight = torch.zeros(len(ctx.layers), dtype=torch.bool, device=ctx.device)
        weight[ctx.weight_layers] = True
        self._weight = weight
        # Per-layer thresholds with the weight-layer mask folded in (a NaN or -inf bound never holds).
        self._zero_at = torch.where(weight, 0.0, math.nan)  # grad_sq == _zero_at: an exact zero at a weight layer
        self._low_at = torch.where(weight, self.min_ratio, -math.inf)  # ratio < _low_at
        relu = [k == "relu" and not ex for k, ex in zip(ctx.activation_kinds, ctx.excluded_activations)]
        self._relu = torch.tensor(relu, dtype=torch.bool, device=ctx.device) if any(relu) else None
        self._explained = False  # a dying-ReLU finding was made: later depth/ratio findings are its symptom
        self.state.bind(ctx.device)
        if self._loaded is not None:
            self._load(self._loaded)
            self._loaded = None

    def _dying(self, rows: list[StepEvidence], low: Tensor) -> list[Tensor]:
        """Per step ``[T]``: whether a layer's ratio check held, the log of the tracked ReLU layers' ``sqrt(2 f)``
        product, and the product; NaN without tracked ReLUs (the dying check then never holds: no op)."""
        if self._relu is None or any(ev.activations is None or ev.activations.active is None for ev in rows):
            nan = self._nan.expand(len(rows))
            return [nan, nan, nan]
        return [low.any(-1), *self._gain(rows)]  # the bool promotes to float in the stack

    def _gain(self, rows: list[StepEvidence]) -> tuple[Tensor, Tensor]:
        """Per step ``[T]``: the log of the tracked ReLU layers' ``sqrt(2 f)`` product, and the product."""
        active = stacked(rows, "act_active", lambda ev: ev.activations.active)  # type: ignore[union-attr]
        seen = stacked(rows, "act_seen", lambda ev: ev.activations.seen)  # type: ignore[union-attr]
        use = self._relu & seen
        log_gain = 0.5 * torch.where(use, (2 * active).clamp_min(TINY).log(), 0.0).sum(-1)
        return log_gain, log_gain.exp()

    def conditions(self, rows: list[StepEvidence], param_norm: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        assert self.ctx is not None
        win = grad_window(rows)
        n = len(rows)
        if self._profile.enabled:
            log_r, depth_value = self._profile.log_ratio(rows, win), self._profile.ratio(rows, win)
        else:
            log_r = depth_value = self._nan.expand(n)
        zero = win.only_present(win.grad_sq == self._zero_at)
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
        # The model-wide checks' figures, to the host: the depth profile's log and ratio, whether a layer's
        # ratio check held, the dying ReLUs' log gain and gain.
        figures = torch.stack([log_r, depth_value, *self._dying(rows, low)], -1)
        self._figures.add(figures, [ev.stats.step for ev in rows])
        return [zero, low], [win.grad_sq, ratio]

    def readout(self) -> dict[str, Tensor]:
        out = super().readout()  # folds the recorded steps
        figures = self._figures.readout()
        if figures is not None:
            out["figures"] = figures
        return out

    def _run(self, steps: list[int], figures: list[float]) -> None:
        """The model-wide checks over the steps' figures (5 per step, oldest first), with the device's
        float32 comparisons: ``depth`` (log ratio below the threshold's log; NaN: no usable layer, False) and
        ``dying`` (``depth`` or a layer's ratio check, with the ReLUs' log gain at most half that log)."""
        host, depth_at, dying_at, persist = self._host, self._depth_at, self._dying_at, self.persist
        for i, step in enumerate(steps):
            log_r, depth_value, low, log_gain, gain = figures[5 * i : 5 * i + 5]
            depth = log_r < depth_at
            host.advance(0, depth, depth_value, step, persist)
            host.advance(1, (depth or low > 0) and log_gain <= dying_at, gain, step, persist)  # NaN > 0: False

    # -- checkpoints: every check's entries side by side, in ``layout`` order, as one stacked persistence
    def state_dict(self) -> dict[str, Any]:
        if not self.state.bound:
            return {} if self._loaded is None else dict(self._loaded)
        self.fold()
        pending = self._figures.take_pending()  # figures not read back yet: one host read, folded now
        if pending is not None:
            self._run(*pending)
        dev = self.state.state_dict()["checks"]
        return {"checks": {k: self._host.side_by_side(k, dev[k]) for k in ("streak", "fired_step", "fired_value")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.state.bound:
            self._load(state)
        else:  # the number of layers is known at bind
            self._loaded = {**(self._loaded or {}), **state}

    def _load(self, state: dict[str, Any]) -> None:
        flat = {k: torch.as_tensor(v).detach().cpu() for k, v in _flatten(state).items()}
        checks = {k: v for k, v in flat.items() if k.startswith("checks.") and v.dim() == 1}
        self._host.load({k[len("checks."):]: v for k, v in checks.items()})
        self.state.load_state_dict({k: v[1:-1] for k, v in checks.items()})

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        if "figures" in values:
            self._run(self._figures.read_steps(), values["figures"])
        names = self.ctx.names
        host = self._host.fired()
        fired = {**self.fired_by_source(values), "depth": host[0], "dying": host[1]}
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


def _f32(x: float) -> float:
    """``x`` rounded to float32 (what a device comparison of a float32 tensor with ``x`` uses)."""
    return torch.tensor(x, dtype=torch.float32).item()


class _HostChecks:
    """Model-wide checks run on the host with :class:`Persistence`'s semantics: a streak per check, and the
    first step (and value) at which it reached ``persist`` kept until :meth:`fired` reads it.

    Args:
        n: number of checks.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.reset()

    def reset(self) -> None:
        """Fresh state."""
        self.streak = [0.0] * self.n
        self.fired_step = [-1.0] * self.n
        self.fired_value = [0.0] * self.n

    def advance(self, k: int, cond: bool, value: float, step: int, persist: int) -> None:
        """Check ``k``'s condition at ``step``: its streak, and the latch where the streak reaches ``persist``."""
        self.streak[k] = self.streak[k] + 1.0 if cond else 0.0
        if self.streak[k] >= persist and self.fired_step[k] < 0:
            self.fired_step[k], self.fired_value[k] = float(step), value

    def fired(self) -> list[list[Fired]]:
        """Per check, its latched entry (index 0; none when free), and free them."""
        out = []
        for k in range(self.n):
            s, v = self.fired_step[k], self.fired_value[k]
            out.append([Fired(0, int(s), v, {"value": v})] if s >= 0 else [])
            self.fired_step[k] = -1.0
        return out

    def side_by_side(self, key: str, dev: Tensor) -> Tensor:
        """The checkpointed ``key`` (``streak``, ``fired_step``, ``fired_value``): the first check, the device's
        entries ``dev``, then the other checks (the layout of the one stacked persistence kept before)."""
        host = getattr(self, key)
        f32 = torch.tensor(host, dtype=torch.float32, device=dev.device)
        return torch.cat([f32[:1], dev.to(torch.float32), f32[1:]])

    def load(self, flat: dict[str, Tensor]) -> None:
        """Restore the host entries of a :meth:`side_by_side` checkpoint (missing keys are kept)."""
        for key in ("streak", "fired_step", "fired_value"):
            if key in flat:
                v = flat[key].tolist()
                setattr(self, key, [v[0], *v[len(v) - self.n + 1 :]])


class _ModelWide:
    """:class:`Exploding`'s model-wide checks (``depth``, ``total``, ``growth``, ``overflow``), run on the host.

    Each is a scalar per step and two are sequential recursions (the early level of the total norm, the
    growth rate); on the device they cost dozens of kernel launches per fold. Four figures per step
    travel in the logging step's one transfer instead (the total gradient norm, the total weight norm,
    the log depth ratio, whether any layer's ratio check held) and the checks run here, in float64,
    microseconds of Python per step, with :class:`Persistence`'s semantics (streaks of ``persist`` steps,
    severity-scaled immediates, the first firing step and value kept until :meth:`fired` reads them).
    """

    def __init__(self, det: Exploding) -> None:
        self.det = det
        self.reset()

    def reset(self) -> None:
        """Fresh state."""
        self.streak = [0.0] * 4  # depth, total, growth, overflow
        self.fired_step = [-1.0] * 4
        self.fired_value = [0.0] * 4
        self.ref_sum = self.ref_count = 0.0  # of the log total norms of the first growth_warmup usable steps
        # The last step folded: its total norm, the growth rates into the two steps before it, whether a check held.
        self.last_total = math.nan
        self.last_rate = [math.nan, math.nan]
        self.last_held = False

    def run(self, steps: list[int], figures: list[float]) -> None:
        """Fold the steps' figures (4 per step, oldest first; see the class docstring)."""
        d = self.det
        depth_at, growth_at, max_ratio = math.log(d.depth_ratio), math.log(d.growth), d.max_ratio
        far, top = math.log(_FAR), math.log(_F32_MAX)
        for i, step in enumerate(steps):
            total, pn, log_r, high = figures[4 * i : 4 * i + 4]
            usable = 0 < total < math.inf  # NaN: False
            log_total = math.log(max(total, TINY)) if total == total else math.nan
            # growth: against the geometric mean of the first growth_warmup usable total norms
            excess = log_total - self.ref_sum / max(self.ref_count, 1.0)
            grow = usable and self.ref_count >= d.growth_warmup and excess > growth_at
            if usable and self.ref_count < d.growth_warmup:
                self.ref_sum += log_total
                self.ref_count += 1.0
            # depth: NaN (a group without usable layers) fails both tests
            depth, depth_far = log_r > depth_at, log_r > depth_at + far
            # total: the total gradient norm over the total weight norm of the present layers
            whole = total / max(pn, TINY) if pn > 0 and total < math.inf else math.nan
            over = whole > max_ratio
            # overflow (see Exploding): at this step's growth rate, Inf within the persistence window, or
            # the Inf itself after fast growth (>= 10x into the step before, not falling the step before that)
            # or after a step where another check held
            prev = self.last_total
            rate = total / max(prev, TINY) if usable and 0 < prev < math.inf else math.nan
            prev2_rate, prev_rate = self.last_rate
            growing = prev_rate >= _FAST_GROWTH and not prev2_rate < 1
            to_inf = rate > 1 and log_total + d.persist * math.log(rate) >= top
            overflow = to_inf or (not total < math.inf and (growing or self.last_held))
            self.last_total, self.last_rate = total, [prev_rate, rate]
            self.last_held = depth or high > 0 or over or grow
            checks = (
                (depth, depth_far, math.exp(log_r) if log_r == log_r else math.nan),
                (over, whole > max_ratio * _FAR, whole),
                (grow, False, math.exp(min(excess, 700.0)) if excess == excess else math.nan),
                (overflow, overflow, rate if usable else prev_rate),
            )
            for k, (cond, now, value) in enumerate(checks):
                self.streak[k] = self.streak[k] + 1.0 if cond else 0.0
                if (self.streak[k] >= d.persist or now) and self.fired_step[k] < 0:
                    self.fired_step[k], self.fired_value[k] = float(step), value

    def fired(self) -> dict[str, list[Fired]]:
        """The latched entries by check (index 0), and free them."""
        out: dict[str, list[Fired]] = {}
        for k, name in enumerate(("depth", "total", "growth", "overflow")):
            s, v = self.fired_step[k], self.fired_value[k]
            out[name] = [Fired(0, int(s), v, {"value": v})] if s >= 0 else []
            self.fired_step[k] = -1.0
        return out

    def load(self, flat: dict[str, Tensor]) -> None:
        """Restore the host entries of :meth:`Exploding.state_dict` (flat names; missing ones are kept)."""
        for key, attr in (("checks.streak", "streak"), ("checks.fired_step", "fired_step"),
                          ("checks.fired_value", "fired_value")):
            if key in flat:
                v = flat[key].tolist()
                setattr(self, attr, [v[0], *v[-3:]])
        if "growth_ref.sum" in flat:
            self.ref_sum = float(flat["growth_ref.sum"])
        if "growth_ref.count" in flat:
            self.ref_count = float(flat["growth_ref.count"])
        if "last.total" in flat:
            self.last_total = float(flat["last.total"].reshape(-1)[0])
        if "last.rate" in flat:
            self.last_rate = [float(x) for x in flat["last.rate"].reshape(-1)]
        if "last.held" in flat:
            self.last_held = bool(flat["last.held"].reshape(-1)[0])


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

    # On the device, per layer: the ratio check. The model-wide checks run on the host (_ModelWide) over
    # four figures per step read back at the logging step; state_dict keeps every check side by side.
    sources = (("ratio", True),)
    layout = ("depth", "ratio", "total", "growth", "overflow")  # the order of the checkpointed entries

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
        self._host = _ModelWide(self)
        self._figures = FigureRows()  # per step: total norm, total weight norm, depth log ratio, a ratio held
        self._loaded: dict[str, Any] | None = None  # a state loaded before bind, as given

    def bind(self, ctx: DetectorContext) -> None:
        if self.state.bound:  # bound again (a new monitor): the host state starts over too
            self._host.reset()
        super().bind(ctx)
        self._profile = DepthProfile(ctx)
        self.state.bind(ctx.device)
        self._imm: list[Tensor] | None = None
        self._floor = _ZERO_WEIGHT_RMS * ctx.numel.sqrt()
        self._nan = torch.full((1,), math.nan, device=ctx.device)
        self._figures = FigureRows()
        if self._loaded is not None:
            self._load(self._loaded)
            self._loaded = None

    def conditions(self, rows: list[StepEvidence], param_norm: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        assert self.ctx is not None
        win = grad_window(rows)
        n = len(rows)
        ratio = relative_to_weights(rows, win, param_norm, self._floor)  # NaN where it means nothing
        high = ratio > self.max_ratio
        # Severity-scaled persistence: 1e4x past the threshold fires on the step it is seen.
        self._imm = [ratio > self.max_ratio * _FAR]
        # Total weight norm over the present layers (NaN: no weight norm known yet).
        pn = win.only_present(param_norm).square().sum(-1).sqrt().expand(n)
        log_r = self._profile.log_ratio(rows, win) if self._profile.enabled else self._nan.expand(n)
        # (the bool promotes to float)
        self._figures.add(torch.stack([win.total, pn, log_r, high.any(-1)], -1), [ev.stats.step for ev in rows])
        return [high], [ratio]

    def immediates(self, steps: int) -> list[Tensor] | None:
        imm, self._imm = self._imm, None
        return imm

    def readout(self) -> dict[str, Tensor]:
        out = super().readout()  # folds the recorded steps
        figures = self._figures.readout()
        if figures is not None:
            out["figures"] = figures
        return out

    # -- checkpoints: every check's entries side by side, in ``layout`` order, as one stacked persistence
    def state_dict(self) -> dict[str, Any]:
        if not self.state.bound:
            return {} if self._loaded is None else dict(self._loaded)
        self.fold()
        pending = self._figures.take_pending()  # figures not read back yet: one host read, folded now
        if pending is not None:
            self._host.run(*pending)
        dev = self.state.state_dict()["checks"]
        h = self._host
        on = dev["streak"].device

        def f32(x: Any) -> Tensor:
            return torch.tensor(x, dtype=torch.float32, device=on)

        def side(host: list[float], t: Tensor) -> Tensor:  # layout order: depth, ratio (per layer), the others
            return torch.cat([f32(host[:1]), t.to(on, torch.float32), f32(host[1:])])

        return {
            "checks": {
                "streak": side(h.streak, dev["streak"]),
                "fired_step": side(h.fired_step, dev["fired_step"]),
                "fired_value": side(h.fired_value, dev["fired_value"]),
            },
            "growth_ref": {"sum": f32(h.ref_sum), "count": f32(h.ref_count)},
            "last": {
                "total": f32([h.last_total]),
                "rate": f32(h.last_rate),
                "held": torch.tensor([h.last_held], device=on),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.state.bound:
            self._load(state)
        else:  # the number of layers is known at bind
            self._loaded = {**(self._loaded or {}), **state}

    def _load(self, state: dict[str, Any]) -> None:
        flat = {k: torch.as_tensor(v).detach().cpu() for k, v in _flatten(state).items()}
        self._host.load(flat)
        self.state.load_state_dict({k: v[1:-3] for k, v in flat.items() if k.startswith("checks.") and v.dim() == 1})

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None
        if "figures" in values:
            self._host.run(self._figures.read_steps(), values["figures"])
        names = self.ctx.names
        fired = {**self.fired_by_source(values), **self._host.fired()}
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
