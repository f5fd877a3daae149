"""Fused per-layer gradient statistics, computed on the device.

Every step costs one ``torch._foreach_norm`` pass over the gradients per (device, dtype)
group: the per-parameter L2 norms are squared and summed into their layers with one
``index_add_``. That pass gives the per-layer norms, the total norm and the non-finite flag
(a sum of squares is non-finite as soon as one entry is). Logging steps add a parameter-norm
pass, and a max-|g| pass every ``grad_max_every`` steps. Half-precision tensors are reduced in
float32. Nothing here reads a value back to the host.

Sharded gradients (FSDP2 / DTensor) are reduced on their local shards and made global with one
all-reduce of one stacked tensor per statistic (see :mod:`gradwatch.distributed`).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradwatch.distributed import ReduceKey, all_reduce_, is_dtensor, local, reduce_key, spans_world
from gradwatch.layers import Layer

_HALF = (torch.float16, torch.bfloat16)
_GRAD = operator.attrgetter("grad")
# One (device, dtype, process groups) group of a gather pattern: positions in the flat parameter list
# (None: every parameter, in order), layer index per tensor, reduce key, DTensor, layer ids, parameters.
_Plan = tuple[list[int] | None, Tensor, ReduceKey, bool, list[int], list[Tensor]]
# Distinct sets of present gradients whose index tensors are cached.
_MAX_PATTERNS = 64


@dataclass
class Gathered:
    """The gradients present this step, grouped by (device, dtype)."""

    key: tuple[bool, ...]
    groups: list[tuple[list[Tensor], list[Tensor], Tensor]]  # (grads, params, layer index per tensor)
    present: Tensor  # bool[L] on the stats device
    present_host: tuple[bool, ...]  # per layer
    grads: list[Tensor]  # every gradient present, in layer order
    # Per group: the process groups its (local, sharded) statistics are summed over; () when not sharded.
    # Gradients and parameters in ``groups`` are then the local shards (views: in-place ops reach them).
    reduce_keys: list[ReduceKey] = field(default_factory=list)
    # Per group: the layer index of each tensor, on the host (local shards are new objects each
    # step, so strategies that single out layers match on these, not on tensor identity).
    layer_ids: list[list[int]] = field(default_factory=list)
    # Every watched parameter's ``.grad`` as read by the gather (layer order, ``None`` where absent):
    # the evidence's carried-gradient check reuses it instead of reading every ``.grad`` again.
    grads_all: list[Tensor | None] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether no layer has a gradient."""
        return not self.grads

    @property
    def sharded(self) -> bool:
        """Whether some gradients are shards whose statistics need a collective."""
        return any(self.reduce_keys)


@dataclass
class GradStats:
    """Per-layer statistics of one step, as device tensors (float32, length = number of layers).

    Layers without a gradient this step have ``present`` False and zeros elsewhere.
    ``param_norm`` is filled on the full (logging) steps that ask for it (every
    ``param_norm_every`` steps); the detectors use the last ``param_norm`` known, since weights
    move slowly. ``grad_max`` is filled on the full steps that ask for it (every ``grad_max_every``
    steps).
    """

    step: int
    present: Tensor
    present_host: tuple[bool, ...]
    grad_sq: Tensor
    grad_norm: Tensor
    total_norm: Tensor
    nonfinite: Tensor  # bool[L]
    any_nonfinite: Tensor  # bool scalar
    grad_max: Tensor | None = None
    param_norm: Tensor | None = None
    inv_scale: Tensor | None = None  # 1/scale when the gradients are still AMP-scaled (statistics are unscaled)
    agreed: bool = False  # any_nonfinite was all-reduced with the statistics: the same on every rank
    logging: bool = False  # computed for a logging step (``param_norm``/``grad_max`` where due)

    @property
    def full(self) -> bool:
        """Whether these are a logging step's statistics (parameter norms present or not due)."""
        return self.logging or self.param_norm is not None


def _keys(gathered: Gathered) -> list[ReduceKey]:
    return gathered.reduce_keys or [()] * len(gathered.groups)


# Devices whose max |g| is taken tensor by tensor (one aminmax each) instead of one foreach kernel.
PER_TENSOR_MAX_DEVICES: tuple[str, ...] = ("cpu",)


def foreach_norms(tensors: list[Tensor], ord: float) -> Tensor:
    """float32[len(tensors)]: each tensor's ``ord``-norm, one fused kernel (half types reduced in float32).

    The one foreach-norm helper: statistics, clipping and the sharded global norm all use it.
    """
    if tensors[0].dtype in _HALF:
        out = torch._foreach_norm(tensors, ord, dtype=torch.float32)
    else:
        out = torch._foreach_norm(tensors, ord)
    return torch.stack(out).to(torch.float32)


def _norms(tensors: list[Tensor], ord: float, dtype: torch.dtype) -> Tensor:
    if ord == float("inf") and tensors[0].device.type in PER_TENSOR_MAX_DEVICES:
        # On CPU, _foreach_norm(ord=inf) runs an unvectorised |x| then max: ~15x the time of the
        # L2 pass (benchmarks/README.md). max(|min|, max) from one aminmax pass reads the data once.
        lo, hi = zip(*(torch.aminmax(t) for t in tensors))
        return torch.maximum(torch.stack(hi), torch.stack(lo).neg()).to(torch.float32)
    return foreach_norms(tensors, ord)


def total_norm(gathered: Gathered, norm_type: float, device: torch.device) -> Tensor:
    """Total ``norm_type``-norm of the gathered gradients, in float32 on ``device``.

    Computed once, applied separately (as ``torch.nn.utils.clip_grad``): the clippers and the
    post-clip figure call it; sharded (FSDP2 / DTensor) local shards are made global with one
    collective.
    """
    if gathered.sharded:
        from gradwatch.distributed import global_norm

        return global_norm([(g, k) for (g, _, _), k in zip(gathered.groups, gathered.reduce_keys)], norm_type, device)
    parts = [
        torch.linalg.vector_norm(foreach_norms(grads, norm_type), norm_type).to(device)
        for grads, _, _ in gathered.groups
    ]
    if not parts:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(parts), norm_type)


class StatsCollector:
    """Computes :class:`GradStats` for a fixed list of layers.

    Args:
        layers: the layers, in the order statistics are reported.
        device: where the stacked statistics live (the device of the first parameter by default).
    """

    def __init__(self, layers: list[Layer], device: torch.device | None = None) -> None:
        self.layers = layers
        params = [p for layer in layers for p in layer.params]
        self.device = device or (params[0].device if params else torch.device("cpu"))
        self._flat: list[tuple[int, torch.nn.Parameter]] = [
            (i, p) for i, layer in enumerate(layers) for p in layer.params
        ]
        self._cache: dict[tuple[bool, ...], tuple[list[tuple[list[int], Tensor]], Tensor, tuple[bool, ...]]] = {}
        self._params = [p for _, p in self._flat]

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.layers)

    def gather(self) -> Gathered:
        """Collect the gradients present now (a host-side walk; no device work)."""
        grads_all = list(map(_GRAD, self._params))
        # Identity tests in C (`None in grads_all` would call Tensor.__eq__ on every gradient).
        key = tuple(map(operator.is_not, grads_all, itertools.repeat(None)))
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= _MAX_PATTERNS:  # e.g. mixture-of-experts routing: keep memory bounded
                self._cache.clear()
            cached = self._build_index(key)
            self._cache[key] = cached
        plan, present, present_host = cached
        groups = []
        keys = []
        layer_ids = []
        for positions, layer_idx, rkey, dtensors, ids, held in plan:
            layer_ids.append(ids)
            grads = grads_all if positions is None else [grads_all[j] for j in positions]
            params = held
            if dtensors:  # FSDP2 / DTensor: work on the local shards
                grads = [local(g) for g in grads]  # type: ignore[arg-type]
                params = [local(p) for p in params]
            groups.append((grads, params, layer_idx))
            keys.append(rkey)
        return Gathered(
            key=key,
            groups=groups,
            present=present,
            present_host=present_host,
            grads=groups[0][0] if len(groups) == 1 else [g for grads, _, _ in groups for g in grads],
            reduce_keys=keys,
            layer_ids=layer_ids,
            grads_all=grads_all,
        )

    def _present_host(self, key: tuple[bool, ...]) -> list[bool]:
        out = [False] * len(self.layers)
        for (i, _), has in zip(self._flat, key):
            out[i] = out[i] or has
        return out

    def _build_index(self, key: tuple[bool, ...]) -> tuple[list[_Plan], Tensor, tuple[bool, ...]]:
        by_group: dict[tuple[torch.device, torch.dtype, ReduceKey, bool], list[int]] = defaultdict(list)
        for j, ((_, p), has) in enumerate(zip(self._flat, key)):
            if has:
                g = p.grad
                assert g is not None
                by_group[(g.device, g.dtype, reduce_key(g), is_dtensor(g))].append(j)
        plan = []
        for (_, _, rkey, dtensors), positions in by_group.items():
            ids = [self._flat[j][0] for j in positions]
            idx = torch.tensor(ids, dtype=torch.long, device=self.device)
            # The layer ids and parameters of a pattern are fixed: made once here, not walked every step.
            held = [self._flat[j][1] for j in positions]
            # One group of every gradient, in order (the common case): gather takes the list as it is.
            whole = len(by_group) == 1 and len(positions) == len(self._flat)
            plan.append((None if whole else positions, idx, rkey, dtensors, ids, held))
        present_host = tuple(self._present_host(key))
        present = torch.tensor(present_host, dtype=torch.bool, device=self.device)
        return plan, present, present_host

    def _per_layer(
        self, gathered: Gathered, which: str, ord: float, flag: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Sum of squares (ord=2) or max (ord=inf) per layer, float32 on the stats device.

        Sharded gradients contribute their local shards, made global with one all-reduce of one
        stacked tensor (per set of process groups; FSDP2 has one). With ``flag``, that stacked
        tensor also carries whether this rank's unsharded values are non-finite, and the second
        result is that flag summed over the ranks (``None`` when nothing was reduced).
        """
        out = torch.zeros(len(self.layers), dtype=torch.float32, device=self.device)
        shards: dict[ReduceKey, Tensor] = {}
        for (grads, params, layer_idx), rkey in zip(gathered.groups, _keys(gathered)):
            tensors = grads if which == "grad" else params  # callers hold no_grad: no detach per tensor
            dtype = tensors[0].dtype
            if ord != 2 and any(t.numel() == 0 for t in tensors):
                # Empty local shards (uneven FSDP sharding) have no max; they contribute nothing.
                keep = [i for i, t in enumerate(tensors) if t.numel() > 0]
                if not keep:
                    continue
                tensors = [tensors[i] for i in keep]
                layer_idx = layer_idx[torch.tensor(keep, device=layer_idx.device)]
            acc = out if not rkey else shards.setdefault(rkey, torch.zeros_like(out))
            vals = _norms(tensors, ord, dtype).to(self.device, non_blocking=True)
            if ord == 2:
                acc.index_add_(0, layer_idx, vals * vals)
            else:
                acc.scatter_reduce_(0, layer_idx, vals, reduce="amax", include_self=True)
        if not shards:
            return out, None
        agreed: Tensor | None = None
        # Whether this rank's unsharded values are non-finite (a NaN there would not travel otherwise).
        mine = (~torch.isfinite(out.sum())).to(torch.float32).reshape(1) if flag and ord == 2 else None
        for rkey, acc in shards.items():
            if ord == 2:
                if mine is not None:
                    acc = torch.cat([acc, mine])
                all_reduce_(acc, rkey, "sum")
                if mine is not None:
                    acc, f = acc[:-1], acc[-1]
                    agreed = f if agreed is None else agreed + f
                out = out + acc
            else:
                out = torch.maximum(out, all_reduce_(acc, rkey, "max"))
        return out, agreed

    def compute(
        self,
        gathered: Gathered,
        step: int,
        *,
        full: bool,
        inv_scale: Tensor | None = None,
        grad_max: bool = True,
        param_norm: bool = True,
    ) -> GradStats:
        """Compute the statistics of the gathered gradients.

        Args:
            gathered: from :meth:`gather`.
            step: the optimizer step these gradients belong to.
            full: a logging step: also compute max |g| with ``grad_max`` and the parameter norms
                with ``param_norm``.
            inv_scale: multiply gradient statistics by this (AMP gradients not yet unscaled).
            grad_max: on a full step, also compute max |g| (one more pass over the gradients).
            param_norm: on a full step, also compute the parameter norms (one pass over the weights).
        """
        with torch.no_grad():
            grad_sq, flag = self._per_layer(gathered, "grad", 2.0, flag=True)
            if inv_scale is not None:
                grad_sq = grad_sq * (inv_scale.to(self.device, torch.float32) ** 2)
            total_sq = grad_sq.sum()
            # A sum of squares is >= 0, +inf or NaN: it is finite exactly when it is < inf (2 ops, where
            # torch.isfinite dispatches 5 on every step).
            nonfinite = (grad_sq < math.inf).logical_not_()
            stats = GradStats(
                step=step,
                present=gathered.present,
                present_host=gathered.present_host,
                grad_sq=grad_sq,
                grad_norm=grad_sq.sqrt(),
                total_norm=total_sq.sqrt(),
                nonfinite=nonfinite,
                any_nonfinite=(total_sq < math.inf).logical_not_(),
                inv_scale=inv_scale,
                logging=full,
            )
            if flag is not None:
                # A non-finite unsharded gradient on any rank, or a non-finite global sum.
                stats.any_nonfinite = stats.any_nonfinite | (flag > 0)
                stats.agreed = any(spans_world(k) for k in gathered.reduce_keys)
            if full and grad_max:
                gmax, _ = self._per_layer(gathered, "grad", float("inf"))
                if inv_scale is not None:
                    gmax = gmax * inv_scale.to(self.device, torch.float32)
                stats.grad_max = gmax
            if full and param_norm:
                stats.param_norm = self._per_layer(gathered, "param", 2.0)[0].sqrt()
        return stats

    def nonfinite_counts(self, gathered: Gathered) -> Tensor:
        """Number of non-finite gradient entries per layer (a full pass; used on rare steps only)."""
        out = torch.zeros(len(self.layers), dtype=torch.float32, device=self.device)
        shards: dict[ReduceKey, Tensor] = {}
        with torch.no_grad():
            for (grads, _, layer_idx), rkey in zip(gathered.groups, _keys(gathered)):
                acc = out if not rkey else shards.setdefault(rkey, torch.zeros_like(out))
                counts = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).to(self.device)
                acc.index_add_(0, layer_idx, counts.to(torch.float32))
            for rkey, acc in shards.items():
                out += all_reduce_(acc, rkey, "sum")
        return out
