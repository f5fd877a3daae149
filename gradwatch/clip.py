"""Clipping strategies, applied in place to the gradients on the device.

Every strategy follows ``torch.nn.utils.clip_grad_norm_``: the clip coefficient is clamped to
at most 1 and always multiplied in, instead of testing ``if coef < 1`` (a host sync). Each
returns its threshold and coefficient as device tensors; the monitor reports them as
``clip/threshold`` and ``clip/coef`` on logging steps, while ``grad_norm/*`` keeps showing the
pre-clip norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from gradwatch._checks import check_positive
from gradwatch.stats import Gathered, GradStats

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


def total_norm(gathered: Gathered, norm_type: float, device: torch.device) -> Tensor:
    """Total ``norm_type``-norm of the gathered gradients, in float32 on ``device``."""
    parts = []
    for grads, _, _ in gathered.groups:
        if grads[0].dtype in (torch.float16, torch.bfloat16):
            norms = torch._foreach_norm(grads, norm_type, dtype=torch.float32)
        else:
            norms = torch._foreach_norm(grads, norm_type)
        parts.append(torch.linalg.vector_norm(torch.stack(norms).float(), norm_type).to(device))
    if not parts:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(parts), norm_type)


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
            norm = stats.total_norm
        else:
            norm = total_norm(gathered, self.norm_type, stats.total_norm.device)
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

    def __init__(self, clip_value: float) -> None:
        self.clip_value = check_positive("clip_value", clip_value)

    def clip_(self, gathered: Gathered, stats: GradStats) -> ClipResult:
        # max |g| is only known on logging steps, the only steps where clip/coef is reported.
        gmax = stats.grad_max.max() if stats.grad_max is not None else torch.full_like(stats.total_norm, float("nan"))
        for grads, _, _ in gathered.groups:
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        coef = (self.clip_value / gmax.clamp_min(_EPS)).clamp(max=1.0)
        return ClipResult(torch.full_like(coef, self.clip_value), coef)

    def __repr__(self) -> str:
        return f"Value(clip_value={self.clip_value:g})"
