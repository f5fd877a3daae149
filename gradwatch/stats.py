"""Fused per-layer gradient statistics, computed on the device.

Every step costs one ``torch._foreach_norm`` pass over the gradients per (device, dtype)
group: the per-parameter L2 norms are squared and summed into their layers with one
``index_add_``. That pass gives the per-layer norms, the total norm and the non-finite flag
(a sum of squares is non-finite as soon as one entry is). Logging steps add a max-|g| pass and a
parameter-norm pass. Half-precision tensors are reduced in float32. Nothing here reads a value
back to the host.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.layers import Layer

_HALF = (torch.float16, torch.bfloat16)
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

    @property
    def empty(self) -> bool:
        """Whether no layer has a gradient."""
        return not self.grads


@dataclass
class GradStats:
    """Per-layer statistics of one step, as device tensors (float32, length = number of layers).

    Layers without a gradient this step have ``present`` False and zeros elsewhere.
    ``grad_max`` and ``param_norm`` are filled on full (logging) steps only; the detectors use
    the last ``param_norm`` known, since weights move slowly.
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

    @property
    def full(self) -> bool:
        """Whether the logging-step statistics are present."""
        return self.grad_max is not None


def _norms(tensors: list[Tensor], ord: float, dtype: torch.dtype) -> Tensor:
    if dtype in _HALF:
        out = torch._foreach_norm(tensors, ord, dtype=torch.float32)
    else:
        out = torch._foreach_norm(tensors, ord)
    return torch.stack(out).to(torch.float32)


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

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.layers)

    def gather(self) -> Gathered:
        """Collect the gradients present now (a host-side walk; no device work)."""
        grads_all = [p.grad for _, p in self._flat]
        key = tuple(g is not None for g in grads_all)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= _MAX_PATTERNS:  # e.g. mixture-of-experts routing: keep memory bounded
                self._cache.clear()
            cached = self._build_index(key)
            self._cache[key] = cached
        plan, present, present_host = cached
        groups = []
        for positions, layer_idx in plan:
            grads = [grads_all[j] for j in positions]
            params = [self._flat[j][1] for j in positions]
            groups.append((grads, params, layer_idx))
        return Gathered(
            key=key,
            groups=groups,
            present=present,
            present_host=present_host,
            grads=[g for g in grads_all if g is not None],
        )

    def _present_host(self, key: tuple[bool, ...]) -> list[bool]:
        out = [False] * len(self.layers)
        for (i, _), has in zip(self._flat, key):
            out[i] = out[i] or has
        return out

    def _build_index(
        self, key: tuple[bool, ...]
    ) -> tuple[list[tuple[list[int], Tensor]], Tensor, tuple[bool, ...]]:
        by_group: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for j, ((_, p), has) in enumerate(zip(self._flat, key)):
            if has:
                g = p.grad
                by_group[(g.device, g.dtype)].append(j)
        plan = []
        for positions in by_group.values():
            idx = torch.tensor([self._flat[j][0] for j in positions], dtype=torch.long, device=self.device)
            plan.append((positions, idx))
        present_host = tuple(self._present_host(key))
        present = torch.tensor(present_host, dtype=torch.bool, device=self.device)
        return plan, present, present_host

    def _per_layer(self, gathered: Gathered, which: str, ord: float) -> Tensor:
        """Sum of squares (ord=2) or max (ord=inf) per layer, float32 on the stats device."""
        out = torch.zeros(len(self.layers), dtype=torch.float32, device=self.device)
        for grads, params, layer_idx in gathered.groups:
            tensors = grads if which == "grad" else [p.detach() for p in params]
            dtype = tensors[0].dtype
            vals = _norms(tensors, ord, dtype).to(self.device, non_blocking=True)
            if ord == 2:
                out.index_add_(0, layer_idx, vals * vals)
            else:
                out.scatter_reduce_(0, layer_idx, vals, reduce="amax", include_self=True)
        return out

    def compute(
        self,
        gathered: Gathered,
        step: int,
        *,
        full: bool,
        inv_scale: Tensor | None = None,
    ) -> GradStats:
        """Compute the statistics of the gathered gradients.

        Args:
            gathered: from :meth:`gather`.
            step: the optimizer step these gradients belong to.
            full: also compute max |g| and parameter norms (logging steps).
            inv_scale: multiply gradient statistics by this (AMP gradients not yet unscaled).
        """
        with torch.no_grad():
            grad_sq = self._per_layer(gathered, "grad", 2.0)
            if inv_scale is not None:
                grad_sq = grad_sq * (inv_scale.to(self.device, torch.float32) ** 2)
            total_sq = grad_sq.sum()
            nonfinite = ~torch.isfinite(grad_sq)
            stats = GradStats(
                step=step,
                present=gathered.present,
                present_host=gathered.present_host,
                grad_sq=grad_sq,
                grad_norm=grad_sq.sqrt(),
                total_norm=total_sq.sqrt(),
                nonfinite=nonfinite,
                any_nonfinite=~torch.isfinite(total_sq),
                inv_scale=inv_scale,
            )
            if full:
                gmax = self._per_layer(gathered, "grad", float("inf"))
                if inv_scale is not None:
                    gmax = gmax * inv_scale.to(self.device, torch.float32)
                stats.grad_max = gmax
                stats.param_norm = self._per_layer(gathered, "param", 2.0).sqrt()
        return stats

    def nonfinite_counts(self, gathered: Gathered) -> Tensor:
        """Number of non-finite gradient entries per layer (a full pass; used on rare steps only)."""
        out = torch.zeros(len(self.layers), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for grads, _, layer_idx in gathered.groups:
                counts = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).to(self.device)
                out.index_add_(0, layer_idx, counts.to(torch.float32))
        return out
