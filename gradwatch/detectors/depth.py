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
import operator
from array import array
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_positive, check_range
from gradwatch.detectors._common import HostChecked, HostPersistence, HostRow, HostRows, fmt, host_list
from gradwatch.detectors.base import (
    TINY,
    DetectorContext,
    Finding,
    Fired,
    StepEvidence,
    _flatten,
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


class _LayerFigures:
    """What Vanishing and Exploding compare per layer, on the host, from the values read back at the logging step.

    The device's arithmetic is float32; so is this (the gradient norms and weight norms read back are the
    device's float32 figures, and a quotient of two float32 values computed in float64 and rounded to
    float32 is the float32 quotient itself): the gradient-to-weight ratio ``||g|| / ||w||`` per layer, NaN
    where it means nothing. It means
    something where the layer has a finite, non-zero gradient and a finite weight norm above ``floor``
    (``_ZERO_WEIGHT_RMS`` times the root of its element count: deliberately zero weights give a ratio that
    means nothing; a non-finite weight norm, weights already overflowed, would give 0), so every comparison
    with a NaN is False and the conditions need no mask of their own.

    The depth profile (:meth:`log_ratio`) compares the earliest and latest quarter of the weight layers (at
    least one each) by the geometric means of their gradient RMS, so a single unusual layer (a small head, a
    zero-initialised projection) cannot decide alone; computed in float64.
    """

    def __init__(self, ctx: DetectorContext) -> None:
        w = ctx.weight_layers
        k = max(1, len(w) // 4)
        self.n = len(ctx.layers)
        self.weight = list(w)
        self.depth_enabled = len(w) >= 3
        self.early, self.late = (list(w[:k]), list(w[-k:])) if self.depth_enabled else ([], [])
        self.first_layer = w[0] if w else 0
        self.floor_t = _ZERO_WEIGHT_RMS * ctx.numel.sqrt()  # float32, read back once (the first read)
        self._ctx = id(ctx)  # detectors bound to one context derive the same figures from the same step
        self._log_key = ("log_ratio", self._ctx)
        self.numel_t = ctx.numel
        self.floor: list[float] | None = None
        self._half_log_numel: array[float] = array("d")
        self.reset()

    def reset(self) -> None:
        """No weight norm known (the ratios are NaN until a step brings them)."""
        self._pn: array[float] | None = None  # the last weight norms known, NaN where no ratio means anything
        self._raw: list[float] | None = None  # the last weight norms known, as read
        self._pn_at: int | None = None  # the step that brought them
        self._total_all = math.nan  # their total norm

    def consts(self) -> dict[str, Tensor]:
        """The per-layer constants to read back once (none once known)."""
        return {} if self.floor is not None else {"floor": self.floor_t, "numel": self.numel_t}

    def take_consts(self, values: Mapping[str, Any]) -> None:
        """Keep the constants :meth:`consts` handed over (when they are in ``values``)."""
        if "floor" in values:
            self.floor = host_list(values["floor"])
            # (contiguous doubles, not a list of float objects: read every step, they stay few cache lines)
            self._half_log_numel = array("d", [0.5 * math.log(max(x, 1.0)) for x in host_list(values["numel"])])

    def read_consts(self) -> None:
        """Read the constants now (one host read: checkpoints only)."""
        if self.floor is None:
            self.take_consts({"floor": self.floor_t.tolist(), "numel": self.numel_t.tolist()})

    def param_norm(self, pn: list[float], step: int) -> None:
        """New weight norms (brought by step ``step``)."""
        assert self.floor is not None
        inf = math.inf
        self._raw, self._pn_at = pn, step
        self._total_all = math.sqrt(math.fsum(p * p for p in pn))
        # Contiguous doubles (read every step until the next weight read: a list's float objects scatter in memory).
        self._pn = array("d", [p if f < p < inf else math.nan for p, f in zip(pn, self.floor)])

    def total_weight(self, present: tuple[bool, ...]) -> float:
        """The total weight norm of the present layers (float64; NaN: no weight norm known yet)."""
        raw = self._raw
        if raw is None:
            return math.nan
        if all(present):
            return self._total_all
        return math.sqrt(math.fsum(p * p for p, ok in zip(raw, present) if ok))

    def may_cross(self, row: HostRow, test: Any) -> bool:
        """Whether ``test`` holds for some float64 quotient ``||g|| / ||w||`` of the row (``low.__gt__``: one below
        ``low``; ``high.__lt__``: one above ``high``): necessary for a float32 ratio of :meth:`ratios` to cross a
        float32 bound, rounding to float32 being monotonic (so a healthy step skips the ratios, one C-level scan)."""
        pn = self._pn
        return pn is not None and any(map(test, map(operator.truediv, row.cols["grad_norm"], pn)))

    def ratios(self, row: HostRow) -> list[float]:
        """float32 ``||g|| / ||w||`` per layer of the row; NaN where it means nothing (shared through the row's memo
        by the detectors that know the same weight norms)."""
        key = ("ratios", self._ctx, self._pn_at)
        out = row.memo.get(key)
        if out is None:
            out = row.memo[key] = self._ratios(row.cols["grad_norm"], row.present)
        return out  # type: ignore[no-any-return]

    def _ratios(self, norms: list[float], present: tuple[bool, ...]) -> list[float]:
        pn = self._pn
        if pn is None:
            return [math.nan] * self.n
        # The device's norms (its float32 square roots, not the host's: they differ in the last bit at times).
        r = array("f", map(operator.truediv, norms, pn)).tolist()  # pn: NaN where invalid, never 0; NaN / x: NaN
        if 0.0 in norms or math.inf in norms:  # not usable: a zero or an infinite gradient
            r = [x if 0.0 < v < math.inf else math.nan for x, v in zip(r, norms)]
        if not all(present):
            r = [x if p else math.nan for x, p in zip(r, present)]
        return r

    def log_ratio(self, row: HostRow) -> float:
        """log(early RMS / late RMS) of the row, NaN where a group has no usable layer (float64)."""
        if not self.depth_enabled:
            return math.nan
        out = row.memo.get(self._log_key)
        if out is None:
            out = row.memo[self._log_key] = self._log_ratio(row.cols["grad_norm"], row.present)
        return out  # type: ignore[no-any-return]

    def _log_ratio(self, norms: list[float], present: tuple[bool, ...]) -> float:
        means = []
        for group in (self.early, self.late):
            s, c = 0.0, 0
            for i in group:
                v = norms[i]
                if 0.0 < v < math.inf and present[i]:
                    s += math.log(v) - self._half_log_numel[i]
                    c += 1
            if not c:
                return math.nan
            means.append(s / c)
        return means[0] - means[1]


class _LayerChecked(HostChecked):
    """Vanishing's and Exploding's host plumbing: the per-layer constants (:class:`_LayerFigures`) travel in the
    first logging step's transfer (or are read at a checkpoint taken before it)."""

    _layers: _LayerFigures

    def readout(self) -> dict[str, Tensor]:
        out = super().readout()
        out.update(self._layers.consts())  # (none once known)
        return out

    def _fold_pending(self) -> None:
        self._layers.read_consts()  # (no read once known)
        super()._fold_pending()


class Vanishing(_LayerChecked):
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

    # Every check runs on the host, over the raw figures read back at the logging step (the squared gradient
    # norms, the weight norms when new, the unreached and blocked layers, the ReLUs' on-fractions): per layer
    # ``zero`` and ``ratio`` (HostPersistence), model-wide ``depth`` and ``dying`` (_HostChecks). state_dict
    # keeps every check's entries side by side, in ``layout`` order.
    layout = ("depth", "zero", "ratio", "dying")

    def __init__(self, depth_ratio: float = 1e-4, min_ratio: float = 1e-8, persist: int = 3) -> None:
        super().__init__()
        self.persist = check_int("persist", persist, 1)
        self.depth_ratio = check_range("depth_ratio", depth_ratio, 0.0, 1.0)
        self.min_ratio = check_range("min_ratio", min_ratio, 0.0, 1.0)
        self._depth_at = math.log(self.depth_ratio)
        self._dying_at = 0.5 * math.log(self.depth_ratio)
        self._low_at = _f32(self.min_ratio)  # the ratio is a float32 figure, compared with a float32 bound
        self._host = _HostChecks(2)  # depth, dying
        self._zero = self._ratio = HostPersistence(0, self.persist)

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self._host.reset()
        n = len(ctx.layers)
        self._zero, self._ratio = HostPersistence(n, self.persist), HostPersistence(n, self.persist)
        self._layers = _LayerFigures(ctx)
        relu = [k == "relu" and not ex for k, ex in zip(ctx.activation_kinds, ctx.excluded_activations)]
        self._relu = [i for i, r in enumerate(relu) if r]
        columns: dict[str, Any] = {
            "grad_norm": lambda ev: ev.stats.grad_norm,
            "param_norm": lambda ev: ev.stats.param_norm,
            "unreached": lambda ev: ev.unreached,
        }
        if self._relu:
            columns["act_active"] = lambda ev: None if ev.activations is None else ev.activations.active
            columns["act_seen"] = lambda ev: None if ev.activations is None else ev.activations.seen
        self._explained = False  # a dying-ReLU finding was made: later depth/ratio findings are its symptom
        self._bound(ctx, HostRows(columns, extra=self._blocked))

    def _blocked(self, rows: list[StepEvidence]) -> dict[str, Tensor]:
        """``[T, L]`` exact zeros that nothing in the model explains (no_gradient's): with tracked activations only."""
        assert self.ctx is not None
        if rows[-1].activations is None or any(ev.activations is None for ev in rows):
            return {}
        grad_sq = stacked(rows, "grad_sq", lambda ev: ev.stats.grad_sq)
        present = stacked(rows, "present", lambda ev: ev.stats.present)
        blocked = blocked_zero(rows, grad_sq, present, self.ctx)
        return {} if blocked is None else {"blocked": blocked}

    def _run(self, rows: list[HostRow]) -> None:
        """Every check over the rows read back, oldest first, with the device's float32 figures per layer."""
        lay, host, persist, low_at = self._layers, self._host, self.persist, self._low_at
        weight = lay.weight
        # The dying check needs the ReLUs' on-fractions on every step of the window (else it never holds).
        gains = self._relu and all("act_active" in r.cols for r in rows)
        for row in rows:
            step, present, cols, _ = row
            g = cols["grad_norm"]  # zero exactly where the squared norm is
            if "param_norm" in cols:
                lay.param_norm(cols["param_norm"], step)
            low: list[int] = []
            ratio: list[float] = []  # (read only at the entries that hold)
            if lay.may_cross(row, low_at.__gt__):  # (NaN compares False)
                ratio = lay.ratios(row)
                low = [i for i in weight if ratio[i] < low_at]
            zero: list[int] = []
            if 0.0 in g:  # an exact zero at a weight layer with a gradient, that backward wrote and nothing explains
                unreached, blocked = cols.get("unreached"), cols.get("blocked")
                zero = [
                    i for i in weight
                    if g[i] == 0.0 and present[i] and not (unreached and unreached[i]) and not (blocked and blocked[i])
                ]
            # (advance only what holds now or held the step before: nothing, in a healthy run)
            if zero or self._zero.active:
                self._zero.advance(zero, g, step)
            if low or self._ratio.active:
                self._ratio.advance(low, ratio, step)
            # depth: log ratio below the threshold's log (NaN, no usable layer: False)
            log_r = lay.log_ratio(row)
            depth = log_r < self._depth_at
            if depth or host.streak[0]:
                host.advance(0, depth, math.exp(log_r), step, persist)
            dying, gain = False, math.nan
            if gains:
                active, seen = cols["act_active"], cols["act_seen"]
                log_gain = 0.5 * sum(math.log(max(2.0 * active[i], TINY)) for i in self._relu if seen[i])
                gain = math.exp(log_gain)
                dying = (depth or bool(low)) and log_gain <= self._dying_at
            if dying or host.streak[1]:
                host.advance(1, dying, gain, step, persist)

    # -- checkpoints: every check's entries side by side, in ``layout`` order
    def state_dict(self) -> dict[str, Any]:
        if not self.state.bound:
            return self._unbound_state()
        assert self.ctx is not None
        self._fold_pending()
        h, z, r = self._host, self._zero, self._ratio
        dev = self.ctx.device

        def side(key: str) -> Tensor:
            host = getattr(h, key)
            entries = [host[0], *getattr(z, key), *getattr(r, key), *host[1:]]
            return torch.tensor(entries, dtype=torch.float32, device=dev)

        return {"checks": {k: side(k) for k in ("streak", "fired_step", "fired_value")}}

    def _load(self, state: dict[str, Any]) -> None:
        flat = {k: torch.as_tensor(v).detach().cpu() for k, v in _flatten(state).items()}
        checks = {k[len("checks."):]: v for k, v in flat.items() if k.startswith("checks.") and v.dim() == 1}
        n = self._zero.n
        for key, v in checks.items():
            if v.numel() != 2 * n + 2:
                raise ValueError(
                    f"`state` holds 'checks.{key}' of shape {tuple(v.shape)} but this detector keeps ({2 * n + 2},)"
                )
        self._host.load(checks)
        for k, p in enumerate((self._zero, self._ratio)):
            lo = 1 + k * n
            p.load(*(checks[key][lo:lo + n].tolist() if key in checks else getattr(p, key)
                     for key in ("streak", "fired_step", "fired_value")))

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None and self._rows is not None
        if "floor" in values:
            self._layers.take_consts(values)
        self._run(self._rows.rows(values))
        if not (self._zero.latched or self._ratio.latched or max(self._host.fired_step) >= 0):
            return []  # nothing latched (no entry to free)
        names = self.ctx.names
        host = self._host.fired()
        fired = {"zero": self._zero.fired(), "ratio": self._ratio.fired(), "depth": host[0], "dying": host[1]}
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
            first = names[self._layers.first_layer]
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
    return array("f", [x])[0]


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
            streak = self.streak
            if not (depth or over or grow or overflow):  # (each check's immediate implies its condition)
                streak[0] = streak[1] = streak[2] = streak[3] = 0.0
                continue
            conds = (depth, over, grow, overflow)
            nows = (depth_far, whole > max_ratio * _FAR, False, overflow)
            for k in range(4):
                streak[k] = streak[k] + 1.0 if conds[k] else 0.0
                if (streak[k] >= d.persist or nows[k]) and self.fired_step[k] < 0:
                    if k == 0:
                        value = math.exp(log_r) if log_r == log_r else math.nan
                    elif k == 1:
                        value = whole
                    elif k == 2:
                        value = math.exp(min(excess, 700.0)) if excess == excess else math.nan
                    else:
                        value = rate if usable else prev_rate
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


class Exploding(_LayerChecked):
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

    # Every check runs on the host, over the raw figures read back at the logging step (the squared gradient
    # norms, the total norm, the weight norms when new): per layer ``ratio`` (HostPersistence), model-wide
    # ``depth``, ``total``, ``growth``, ``overflow`` (_ModelWide). state_dict keeps every check side by side.
    layout = ("depth", "ratio", "total", "growth", "overflow")  # the order of the checkpointed entries

    def __init__(
        self,
        depth_ratio: float = 1e5,
        max_ratio: float = 50.0,
        growth: float = 1e4,
        growth_warmup: int = 20,
        persist: int = 3,
    ) -> None:
        super().__init__()
        self.persist = check_int("persist", persist, 1)
        self.depth_ratio = check_positive("depth_ratio", depth_ratio)
        self.max_ratio = check_positive("max_ratio", max_ratio)
        self.growth = check_positive("growth", growth)
        if self.growth <= 1:
            raise ValueError(f"`growth` must be > 1; got {growth!r}")
        self.growth_warmup = check_int("growth_warmup", growth_warmup, 1)
        # The ratio is a float32 figure, compared with float32 bounds (severity-scaled: 1e4x past fires at once).
        self._high_at, self._far_at = _f32(self.max_ratio), _f32(self.max_ratio * _FAR)
        self._host = _ModelWide(self)
        self._ratio = HostPersistence(0, self.persist)

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self._host.reset()
        self._ratio = HostPersistence(len(ctx.layers), self.persist)
        self._layers = _LayerFigures(ctx)
        self._bound(ctx, HostRows({
            "grad_norm": lambda ev: ev.stats.grad_norm,
            "total_norm": lambda ev: ev.stats.total_norm,
            "param_norm": lambda ev: ev.stats.param_norm,
        }))

    def _run(self, rows: list[HostRow]) -> None:
        """Every check over the rows read back, oldest first: per layer here, model-wide in :class:`_ModelWide`
        (four figures per step: the total norm, the total weight norm, the depth log ratio, a ratio check held)."""
        lay, high_at, far_at = self._layers, self._high_at, self._far_at
        figures: list[float] = []
        for row in rows:
            step, present, cols, _ = row
            if "param_norm" in cols:
                lay.param_norm(cols["param_norm"], step)
            high: list[int] = []
            ratio: list[float] = []  # (read only at the entries that hold)
            if lay.may_cross(row, high_at.__lt__):  # (NaN compares False)
                ratio = lay.ratios(row)
                high = [i for i, r in enumerate(ratio) if r > high_at]
            if high or self._ratio.active:  # (nothing holds now nor did the step before: nothing to advance)
                self._ratio.advance(high, ratio, step, [i for i in high if ratio[i] > far_at])
            total = cols["total_norm"][0]
            figures += [total, lay.total_weight(present), lay.log_ratio(row), 1.0 if high else 0.0]
        self._host.run([r.step for r in rows], figures)

    # -- checkpoints: every check's entries side by side, in ``layout`` order
    def state_dict(self) -> dict[str, Any]:
        if not self.state.bound:
            return self._unbound_state()
        assert self.ctx is not None
        self._fold_pending()
        h, r = self._host, self._ratio
        on = self.ctx.device

        def f32(x: Any) -> Tensor:
            return torch.tensor(x, dtype=torch.float32, device=on)

        def side(key: str) -> Tensor:  # layout order: depth, ratio (per layer), the others
            host = getattr(h, key)
            return f32([host[0], *getattr(r, key), *host[1:]])

        return {
            "checks": {k: side(k) for k in ("streak", "fired_step", "fired_value")},
            "growth_ref": {"sum": f32(h.ref_sum), "count": f32(h.ref_count)},
            "last": {
                "total": f32([h.last_total]),
                "rate": f32(h.last_rate),
                "held": torch.tensor([h.last_held], device=on),
            },
        }

    def _load(self, state: dict[str, Any]) -> None:
        flat = {k: torch.as_tensor(v).detach().cpu() for k, v in _flatten(state).items()}
        n = self._ratio.n
        checks = {k[len("checks."):]: v for k, v in flat.items() if k.startswith("checks.") and v.dim() == 1}
        for key, v in checks.items():
            if v.numel() != n + 4:
                raise ValueError(
                    f"`state` holds 'checks.{key}' of shape {tuple(v.shape)} but this detector keeps ({n + 4},)"
                )
        self._host.load(flat)
        r = self._ratio
        r.load(*(checks[key][1:1 + n].tolist() if key in checks else getattr(r, key)
                 for key in ("streak", "fired_step", "fired_value")))

    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        assert self.ctx is not None and self._rows is not None
        if "floor" in values:
            self._layers.take_consts(values)
        self._run(self._rows.rows(values))
        if not self._ratio.latched and max(self._host.fired_step) < 0:
            return []  # nothing latched (no entry to free)
        names = self.ctx.names
        fired = {"ratio": self._ratio.fired(), **self._host.fired()}
        out: list[Finding] = []
        for f in fired["depth"]:
            first = names[self._layers.first_layer]
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
