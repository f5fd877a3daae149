"""Clipping strategies, applied in place to the gradients on the device.

Every strategy follows ``torch.nn.utils.clip_grad_norm_``: the clip coefficient is clamped to
at most 1 and always multiplied in, instead of testing ``if coef < 1`` (a host sync). Each
returns its threshold and coefficient as device tensors; the monitor reports them as
``clip/threshold`` and ``clip/coef`` on logging steps, while ``grad_norm/*`` keeps showing the
pre-clip norms. Running state (EMAs, histories) lives on the device and travels through
``state_dict``/``load_state_dict``.

Under AMP, when the gradients are still multiplied by the ``GradScaler``'s scale,
``stats.inv_scale`` holds ``1/scale``: every threshold is then compared with the *unscaled*
values and the coefficient is applied to the scaled gradients, which the scaler unscales later.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from gradwatch._checks import check_int, check_positive, check_range
from gradwatch.detectors.base import DeviceState
from gradwatch.stats import Gathered, GradStats, total_norm

if TYPE_CHECKING:
    from gradwatch.layers import Layer

__all__ = ["AGC", "ClipResult", "Clipper", "Norm", "Percentile", "Value", "ZScore"]

_EPS = 1e-6  # as clip_grad_norm_: keeps the coefficient finite for an all-zero gradient


@dataclass
class ClipResult:
    """Threshold and coefficient of one clipping step (0-d float32 device tensors)."""

    threshold: Tensor
    coef: Tensor


@runtime_checkable
class Clipper(Protocol):
    """Protocol of a clipping strategy."""

    def clip_(self, gathered: Gathered, stats: GradStats) -> ClipResult:
        """Clip ``gathered``'s gradients in place; ``stats`` holds their pre-clip statistics."""

    def state_dict(self) -> dict[str, Any]:
        """Running state (for checkpoints)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def scale_(gathered: Gathered, coef: Tensor) -> None:
    """Multiply every gathered gradient by the 0-d tensor ``coef`` (per device group)."""
    for grads, _, _ in gathered.groups:
        c = coef.to(grads[0].device, non_blocking=True)
        torch._foreach_mul_(grads, c)


class _Stateless:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class Norm(_Stateless):
    """Clip the total gradient norm to ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_``).

    Choose it when you know a sane scale for the total norm; the monitor's exploding alerts
    suggest one from the norms observed.

    Args:
        max_norm: the largest total norm allowed.
        norm_type: order of the norm (2 by default; ``float('inf')`` for the max norm).
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = check_positive("max_norm", max_norm)
        if not (isinstance(norm_type, (int, float)) and not isinstance(norm_type, bool) and norm_type > 0):
            raise ValueError(f"`norm_type` must be a number > 0 or float('inf'); got {norm_type!r}")
        self.norm_type = float(norm_type)

    def clip_(self, gathered: Gathered, stats: GradStats) -> ClipResult:
        if self.norm_type == 2.0:
            norm = stats.total_norm  # already unscaled under AMP
        else:
            norm = total_norm(gathered, self.norm_type, stats.total_norm.device)
            if stats.inv_scale is not None:
                norm = norm * stats.inv_scale.to(norm.device, torch.float32)
        coef = (self.max_norm / (norm + _EPS)).clamp(max=1.0)
        scale_(gathered, coef)
        return ClipResult(torch.full_like(coef, self.max_norm), coef)

    def __repr__(self) -> str:
        return f"Norm(max_norm={self.max_norm:g}, norm_type={self.norm_type:g})"


class Value(_Stateless):
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` (as ``clip_grad_value_``).

    ``clip/coef`` reports ``min(1, clip_value / max|g|)``.

    Args:
        clip_value: the largest magnitude allowed per entry.
    """

    # clip/coef needs max |g| on every logging step: the monitor computes it there (see grad_max_every).
    needs_grad_max = True

    def __init__(self, clip_value: float) -> None:
        self.clip_value = check_positive("clip_value", clip_value)

    def clip_(self, gathered: Gathered, stats: GradStats) -> ClipResult:
        # max |g| is only known on logging steps, the only steps where clip/coef is reported.
        gmax = stats.grad_max.max() if stats.grad_max is not None else torch.full_like(stats.total_norm, float("nan"))
        if stats.inv_scale is None:
            for grads, _, _ in gathered.groups:
                torch._foreach_clamp_min_(grads, -self.clip_value)
                torch._foreach_clamp_max_(grads, self.clip_value)
        else:
            # Still-scaled gradients: the bound is clip_value * scale, a device tensor.
            for grads, _, _ in gathered.groups:
                bound = (self.clip_value / stats.inv_scale.to(grads[0].device, torch.float32)).to(grads[0].dtype)
                for g in grads:
                    g.clamp_(min=-bound, max=bound)
        coef = (self.clip_value / gmax.clamp_min(_EPS)).clamp(max=1.0)
        return ClipResult(torch.full_like(coef, self.clip_value), coef)

    def __repr__(self) -> str:
        return f"Value(clip_value={self.clip_value:g})"


def _safe_coef(threshold: Tensor, norm: Tensor) -> Tensor:
    """``min(1, threshold / (norm + eps))``; 1 where that is not a number (no history yet, NaN norm)."""
    coef = (threshold / (norm + _EPS)).clamp(max=1.0)
    return torch.where(torch.isnan(coef), torch.ones_like(coef), coef)


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or name.startswith(wanted + ".")


class AGC(_Stateless):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale
    Image Recognition Without Normalization").

    For every output unit ``i`` of a weight (row ``i`` of a Linear weight, filter ``i`` of a conv
    weight: all dimensions but the first), when ``||G_i|| / max(||W_i||, eps) > clipping`` the
    unit's gradient is rescaled to norm ``clipping * max(||W_i||, eps)``. 1-D and 0-D parameters
    (biases, norm gains) are treated as one unit. Choose it to train without normalisation
    layers, or with large batches, where one global threshold cannot fit every layer: the bound
    follows each unit's own weight scale. Brock et al. leave the final linear layer unclipped
    (``exclude=["head"]``).

    ``clip/threshold`` reports ``clipping``; ``clip/coef`` the smallest per-unit coefficient of
    the step (1: no unit clipped). Costs a few small kernels per parameter.

    Args:
        clipping: the largest gradient-to-weight norm ratio allowed per unit (λ).
        eps: floor on the weight norm, so zero-initialised units can still move.
        exclude_1d: leave 1-D and 0-D parameters (biases, norm gains) unclipped.
        exclude: layer or module names (or name prefixes up to a dot) to leave unclipped,
            e.g. the final classifier.

    Raises:
        ValueError: a bad argument, or (at the first step) an ``exclude`` name that matches no layer.
    """

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        *,
        exclude_1d: bool = False,
        exclude: str | Sequence[str] = (),
    ) -> None:
        self.clipping = check_positive("clipping", clipping)
        self.eps = check_positive("eps", eps)
        if not isinstance(exclude_1d, bool):
            raise ValueError(f"`exclude_1d` must be True or False; got {exclude_1d!r}")
        names = (exclude,) if isinstance(exclude, str) else exclude
        if not isinstance(names, Sequence) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"`exclude` must be a layer name or a list of layer names; got {exclude!r}")
        self.exclude_1d = exclude_1d
        self.exclude = tuple(names)
        self._excluded: set[int] | None = None  # layer indices

    def bind(self, layers: list[Layer]) -> None:
        """Resolve ``exclude`` against the monitor's layers (called once, at the first step)."""
        excluded: set[int] = set()
        for wanted in self.exclude:
            hit = [i for i, x in enumerate(layers) if _matches(x.name, wanted) or _matches(x.module_name, wanted)]
            if not hit:
                shown = ", ".join(repr(x.name) for x in layers[:20])
                raise ValueError(f"`exclude` name {wanted!r} matches no layer; the layers are: {shown}")
            excluded.update(hit)
        self._excluded = excluded

    def _skips(self, p: Tensor, layer: int) -> bool:
        # By layer index, not tensor identity: FSDP2 hands over new local-shard tensors each step.
        return (self._excluded is not None and layer in self._excluded) or (self.exclude_1d and p.dim() <= 1)

    def clip_(self, gathered: Gathered, stats: GradStats) -> ClipResult:
        if self.exclude and self._excluded is None:
            raise RuntimeError("AGC(exclude=...) needs the layer names: use it through GradWatch(clip=...)")
        dev = stats.total_norm.device
        mins = [torch.ones((), device=dev)]
        with torch.no_grad():
            for (grads, params, _), ids in zip(gathered.groups, gathered.layer_ids):
                inv = stats.inv_scale.to(grads[0].device, torch.float32) if stats.inv_scale is not None else None
                for g, p, layer in zip(grads, params, ids):
                    if self._skips(p, layer):
                        continue
                    if p.dim() >= 2:
                        w_norm = torch.linalg.vector_norm(p.detach().flatten(1), dim=1, dtype=torch.float32)
                        g_norm = torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float32)
                    else:
                        w_norm = torch.linalg.vector_norm(p.detach(), dtype=torch.float32).reshape(1)
                        g_norm = torch.linalg.vector_norm(g, dtype=torch.float32).reshape(1)
                    if inv is not None:
                        g_norm = g_norm * inv
                    max_norm = self.clipping * w_norm.clamp_min(self.eps)
                    # 1e-6 floor as in the paper's code: a zero gradient keeps coefficient 1.
                    coef = (max_norm / g_norm.clamp_min(_EPS)).clamp(max=1.0)
                    shape = (-1,) + (1,) * (g.dim() - 1) if g.dim() >= 2 else ()
                    g.mul_(coef.reshape(shape).to(g.dtype))
                    mins.append(coef.min().to(dev))
        coef = torch.stack(mins).min()
        return ClipResult(torch.full_like(coef, self.clipping), coef)

    def __repr__(self) -> str:
        extra = ", exclude_1d=True" if self.exclude_1d else ""
        extra += f", exclude={list(self.exclude)!r}" if self.exclude else ""
        return f"AGC(clipping={self.clipping:g}, eps={self.eps:g}{extra})"


class _Running(ABC):
    """A clipper with running device state (:class:`~gradwatch.detectors.DeviceState`), allocated on
    the gradients' device at the first step, or restored from a checkpoint before it."""

    def __init__(self) -> None:
        self.state = self._declare()

    @abstractmethod
    def _declare(self) -> DeviceState:
        """A fresh :class:`DeviceState` with this clipper's tensors declared."""

    def _state_on(self, device: torch.device) -> DeviceState:
        if not self.state.bound:
            self.state.bind(device)
        return self.state

    def _check_loaded(self, state: dict[str, Any]) -> None:
        missing = [k for k in self.state.names if k not in state]
        if missing:
            raise ValueError(
                f"`state` for {self!r} lacks {missing}; pass what {type(self).__name__}.state_dict() returned"
            )

    def state_dict(self) -> dict[str, Any]:
        """Running state as device tensors (the restored state if no step ran since loading)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict resets to the fresh state)."""
        if not state:
            self.state = self._declare()
            return
        self._check_loaded(state)
        self.state.load_state_dict(state)


class ZScore(_Running):
    """Z-score clipping of the total norm (ZClip, Kumar et al. 2025, "ZClip: Adaptive Spike
    Mitigation for LLM Pre-Training").

    Keeps an EMA mean ``mu`` and variance ``var`` of the total norm ``g``. After ``warmup``
    steps (whose norms initialise ``mu`` and ``var`` as their mean and population variance, and
    which are not clipped), a step with ``z = (g - mu) / sqrt(var) > z_thresh`` is clipped to
    ``mu + z_thresh * sqrt(var)``, and the EMA is updated with the clipped value so one spike
    does not raise the bar for the next::

        mu  <- alpha * mu  + (1 - alpha) * g_clipped
        var <- alpha * var + (1 - alpha) * (g_clipped - mu_new) ** 2

    Choose it for long runs (LLM pre-training) where the healthy norm drifts: it clips only
    statistical outliers relative to the recent norm, with no scale to pick. It cannot clip
    before it has statistics: a run that diverges within ``warmup`` steps needs ``max_norm``
    (ZClip's ``max_grad_norm``), a fixed total-norm bound applied during warm-up only. Non-finite
    norms leave the state untouched. ``clip/threshold`` is ``max_norm`` (or ``inf``) during warm-up.

    Args:
        alpha: EMA decay per step (0.97 is a ~33-step memory).
        z_thresh: z-score above which a step is clipped.
        warmup: steps that only collect statistics (at least 2, for a variance); their pre-clip
            norms initialise the EMA.
        max_norm: clip the total norm to this during warm-up (``None``: no clipping then).
    """

    def __init__(
        self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, *, max_norm: float | None = None
    ) -> None:
        super().__init__()
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.z_thresh = check_positive("z_thresh", z_thresh)
        self.warmup = check_int("warmup", warmup, 2)
        self.max_norm = None if max_norm is None else check_positive("max_norm", max_norm)

    def _declare(self) -> DeviceState:
        st = DeviceState()
        # m2 is the sum of squared deviations during warm-up (Welford) and the variance afterwards.
        for name in ("count", "mean", "m2"):
            st.add_state(name, lambda dev: torch.zeros((), dtype=torch.float32, device=dev))
        return st

    def clip_(self, gathered: Gathered, stats: GradStats) -> ClipResult:
        st = self._state_on(stats.total_norm.device)
        g = stats.total_norm.to(torch.float32)
        count, mean, m2 = st.count, st.mean, st.m2
        finite = torch.isfinite(g)
        warm = count >= self.warmup
        std = m2.clamp_min(0).sqrt()
        early = math.inf if self.max_norm is None else self.max_norm
        threshold = torch.where(warm, mean + self.z_thresh * std, torch.full_like(g, early))
        coef = torch.where(g > threshold, _safe_coef(threshold, g), torch.ones_like(g))
        scale_(gathered, coef)
        x = torch.where(warm, torch.minimum(g, threshold), g)  # warm-up statistics: the pre-clip norms
        # Warm-up: Welford running mean and sum of squares; the last warm-up step turns m2 into a variance.
        n1 = count + 1
        w_mean = mean + (x - mean) / n1
        w_m2 = m2 + (x - mean) * (x - w_mean)
        w_m2 = torch.where(n1 >= self.warmup, w_m2 / n1, w_m2)
        e_mean = self.alpha * mean + (1 - self.alpha) * x
        e_var = self.alpha * m2 + (1 - self.alpha) * (x - e_mean) ** 2
        st.mean = torch.where(finite, torch.where(warm, e_mean, w_mean), mean)
        st.m2 = torch.where(finite, torch.where(warm, e_var, w_m2), m2)
        st.count = count + finite.to(count.dtype)
        return ClipResult(threshold, coef)

    def __repr__(self) -> str:
        extra = "" if self.max_norm is None else f", max_norm={self.max_norm:g}"
        return f"ZScore(alpha={self.alpha:g}, z_thresh={self.z_thresh:g}, warmup={self.warmup}{extra})"


class Percentile(_Running):
    """Clip the total norm to a percentile of its own history (AutoClip, Seetharaman et al.
    2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks").

    Each step's total norm (pre-clip) enters a ring buffer of the last ``history`` finite norms
    on the device; the threshold is their ``percentile``-th percentile (linear interpolation,
    as ``numpy.percentile``), the current norm included. Choose it when you want clipping with
    no scale to pick and a steady clipping rate (about ``100 - percentile`` percent of steps):
    it adapts to the norm's level as training moves on. ``history`` bounds memory and the
    per-step sort.

    Args:
        percentile: in (0, 100); AutoClip recommends 10.
        history: number of recent norms kept.
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000) -> None:
        self.percentile = check_range("percentile", percentile, 0.0, 100.0)
        self.history = check_int("history", history, 1)
        super().__init__()

    def _declare(self) -> DeviceState:
        st = DeviceState()
        st.add_state("buffer", lambda dev: torch.full((self.history,), math.nan, dtype=torch.float32, device=dev))
        st.add_state("pos", lambda dev: torch.zeros((), dtype=torch.long, device=dev))  # next slot
        st.add_state("count", lambda dev: torch.zeros((), dtype=torch.long, device=dev))  # finite norms seen
        return st

    def _check_loaded(self, state: dict[str, Any]) -> None:
        super()._check_loaded(state)
        shape = tuple(torch.as_tensor(state["buffer"]).shape)
        if shape != (self.history,):
            raise ValueError(
                f"`state` holds a history of {shape} norms but this Percentile keeps "
                f"history={self.history}; build it with the same `history`"
            )

    def clip_(self, gathered: Gathered, stats: GradStats) -> ClipResult:
        st = self._state_on(stats.total_norm.device)
        g = stats.total_norm.to(torch.float32)
        finite = torch.isfinite(g)
        buf, pos = st.buffer, st.pos
        slot = buf.index_select(0, pos.reshape(1)).reshape(())
        buf = buf.index_put((pos.reshape(1),), torch.where(finite, g, slot).reshape(1))
        st.buffer = buf
        st.pos = (pos + finite.to(pos.dtype)) % self.history
        st.count = st.count + finite.to(torch.long)
        threshold = torch.nanquantile(buf, self.percentile / 100.0)
        coef = _safe_coef(threshold, g)
        scale_(gathered, coef)
        return ClipResult(threshold, coef)

    def __repr__(self) -> str:
        return f"Percentile(percentile={self.percentile:g}, history={self.history})"
