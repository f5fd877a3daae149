"""Distributed helpers: local shards of DTensor gradients and the collectives that make norms global.

With DDP every rank holds the same (all-reduced) gradients, so statistics are computed locally and
nothing here runs. With sharded parameters (FSDP2's ``fully_shard``, or any ``DTensor`` sharded
with ``Shard`` placements) each rank holds a piece of every gradient. gradwatch then works on the
local pieces (``grad.to_local()``, which may be uneven or empty) and makes the per-layer numbers
global with one all-reduce of one stacked tensor per statistic: sums of squares are summed (the
L2 norm is the root of the global sum), max |g| is max-reduced. Parameters that are not sharded
(plain tensors, ``Replicate`` placements) are identical on every rank and are not reduced.

Everything here is a no-op in a single process; ``import gradwatch`` does not need
``torch.distributed``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import Tensor

ReduceKey = tuple[Any, ...]
"""The process groups a sharded tensor's statistics are reduced over (``()``: no reduction)."""


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or not distributed).

    Before a process group exists, the launcher's ``RANK``/``LOCAL_RANK``/``SLURM_PROCID`` tell.
    """
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover - exotic builds
        pass
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var]) == 0
            except ValueError:
                continue
    return True


def agree_max(values: Tensor) -> Tensor:
    """Element-wise max over the ranks (one all-reduce, float32); ``values`` itself in one process.

    The one helper for cross-rank agreement: every rank takes the decision the worst rank asks
    for (skip a step, raise), as Lightning's ``reduce_boolean_decision`` does.
    """
    if not is_distributed():
        return values
    import torch.distributed as dist

    f = values.to(torch.float32).reshape(-1).clone()
    if dist.get_backend() == "nccl" and f.device.type != "cuda":
        f = f.cuda()
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return f.to(values.device).reshape(values.shape)


def _dtensor_type() -> type | None:
    # No DTensor can exist before torch.distributed.tensor is imported: a plain run pays nothing.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    if t is None:
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place changes reach the DTensor), else ``t``."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def reduce_key(t: Tensor) -> ReduceKey:
    """The process groups to sum ``t``'s local statistics over.

    One group per mesh dimension on which ``t`` is sharded (``Shard`` placements); ``()`` for
    plain tensors and ``Replicate`` placements (the same values on every rank).

    Raises:
        ValueError: ``t`` has a ``Partial`` placement (pending sums, whose norm is not the sum of
            the local norms): gradwatch must run after the gradients were reduced.
    """
    if not is_dtensor(t):
        return ()
    groups = []
    mesh = t.device_mesh  # type: ignore[attr-defined]
    for dim, placement in enumerate(t.placements):  # type: ignore[attr-defined]
        if placement.is_shard():
            groups.append(mesh.get_group(dim))
        elif placement.is_partial():
            raise ValueError(
                f"gradwatch: a gradient has a Partial placement ({t.placements}); its norm is not defined "  # type: ignore[attr-defined]
                "until it is reduced. Run the monitor after the gradient reduction (e.g. after FSDP's "
                "reduce-scatter, at optimizer.step())."
            )
    return tuple(groups)


def _on_backend_device(t: Tensor, group: Any) -> Tensor:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
        return t.cuda()
    return t


def all_reduce_(t: Tensor, key: ReduceKey, op: str = "sum") -> Tensor:
    """All-reduce ``t`` over every group of ``key`` (``op``: ``"sum"`` or ``"max"``).

    One collective per group: FSDP2's one-dimensional mesh makes it exactly one. Returns the
    reduced tensor (``t`` itself unless the backend needed a copy on another device).
    """
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for group in key:
        buf = _on_backend_device(t, group)
        dist.all_reduce(buf, op=reduce_op, group=group)
        if buf is not t:
            t.copy_(buf)
    return t


def spans_world(key: ReduceKey) -> bool:
    """Whether reducing over ``key`` reaches every rank of the default group."""
    import torch.distributed as dist

    if not key or not is_distributed():
        return False
    size = 1
    for group in key:
        size *= dist.get_world_size(group)
    return size == dist.get_world_size()


def global_norm(groups: list[tuple[list[Tensor], ReduceKey]], norm_type: float, device: torch.device) -> Tensor:
    """Total ``norm_type``-norm of local gradient shards, made global where they are sharded.

    Args:
        groups: ``(local tensors, reduce key)`` pairs; tensors may be empty (empty local shards).
        norm_type: order of the norm (``float('inf')`` for the max norm).
        device: where the 0-d float32 result lives.
    """
    inf = norm_type == float("inf")
    plain: list[Tensor] = []
    sharded: dict[ReduceKey, list[Tensor]] = {}
    for tensors, key in groups:
        tensors = [t for t in tensors if t.numel() > 0] if inf else tensors
        if not tensors and not key:
            continue
        if tensors:
            from gradwatch.stats import foreach_norms  # stats imports this module

            norms = foreach_norms(tensors, norm_type).to(device)
            part = norms.max() if inf else norms.pow(norm_type).sum()
        else:
            part = torch.zeros((), device=device)
        (sharded.setdefault(key, []) if key else plain).append(part)
    parts = [torch.stack(plain).max() if inf else torch.stack(plain).sum()] if plain else []
    for key, vals in sharded.items():
        v = torch.stack(vals)
        v = v.max().reshape(1) if inf else v.sum().reshape(1)
        parts.append(all_reduce_(v, key, "max" if inf else "sum")[0])
    if not parts:
        return torch.zeros((), device=device)
    p = torch.stack(parts)
    return p.max() if inf else p.sum().pow(1.0 / norm_type)


FSDP1_MESSAGE = (
    "gradwatch: this model has parameters flattened by FullyShardedDataParallel (FSDP1). Its gradients "
    "are flat views of this rank's shard, which gradwatch cannot attribute to layers, so the per-layer "
    "and total norms it reports are this rank's part only, not global. Shard with FSDP2 instead "
    "(torch.distributed.fsdp.fully_shard; in Lightning, ModelParallelStrategy): its DTensor gradients "
    "give global norms."
)


def fsdp1_message(params: list[Tensor]) -> str | None:
    """The warning to give when ``params`` are managed by FSDP1 in a distributed run, else ``None``."""
    if is_distributed() and any(getattr(p, "_fsdp_flattened", False) for p in params):
        return FSDP1_MESSAGE
    return None
