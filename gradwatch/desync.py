"""Replicas that drift apart: a cross-rank comparison of the replicated parameters (``desync``).

Data parallelism keeps one copy of the model per rank and relies on every rank applying the same
update. When that breaks -- the loop calls ``ddp.module(x)`` instead of ``ddp(x)`` so the gradient
all-reduce never runs, one rank skips an ``optimizer.step()``, a parameter is changed on one rank
only -- every rank keeps training its own model and nothing fails. :class:`DesyncCheck` finds it.

On a logging step each rank computes a *fingerprint* of every replicated parameter and of its
gradient (the L2 norm and ``K`` random projections ``u_k^T W v_k``), and ONE ``all_gather`` of
one float64 tensor brings every rank's fingerprints to every rank. Each rank then compares them on
the host and reaches the same verdict. Nothing runs on other steps.

* **What is compared.** Plain tensors (DDP, Lightning ``strategy="ddp"``, a single-device model
  replicated by hand) are compared across all ranks. A ``DTensor`` is compared among the ranks
  that hold the same local values: those at the same coordinate of its sharded mesh dimensions
  (HSDP's replicate groups; ``Replicate`` placements everywhere: all ranks). A parameter sharded
  over the whole world (FSDP2's ``fully_shard`` on one mesh dimension) has no replica and is not
  compared; when no parameter has one, the check is off (:meth:`DesyncCheck.for_layers` returns
  ``None``). Buffers are not compared: DDP broadcasts them before each forward and the forward
  then updates them with each rank's own batch, so they differ legitimately at check time.
* **Projections without a projection matrix.** A parameter seen as a ``rows x cols`` matrix ``W``
  (its first dimension by the rest; a vector is ``1 x n``) is projected on ``K`` rank-one
  directions ``u_k v_k^T``: ``u_k^T W v_k``, one matrix-vector product. With standard Gaussian
  ``u, v``, ``E[(u^T D v)^2] = ||D||_F^2`` for any difference ``D``, so a projection sees a
  difference of relative size ``||D||/||W||`` at about that size. ``K = 4`` independent ones:
  measured over 4000 random trials each, a difference 10 times the tolerance escapes all four
  (and the norm) in 0.3 % of rank-one differences (the hardest case: one sample's update of a
  Linear layer) and never for dense ones; 100 times the tolerance, never. The vectors are drawn
  once, from a private ``torch.Generator`` seeded from the parameter's index (never the global
  RNG), identically on every rank. Memory: ``K * (rows + cols)`` float32 per parameter: 32 K floats
  (128 KiB) for a 4096 x 4096 weight, ~11 M floats (45 MiB) for a 7 B-parameter LLaMA-shaped
  transformer -- 0.16 % of its float32 weights.
* **Tolerance.** DDP replicas are bit-identical (the all-reduce hands every rank the same bits;
  the optimizer then runs the same kernels on the same values), and so are their fingerprints: the
  healthy runs of the test suite (DDP, HSDP, Lightning) measure a difference of exactly 0. The
  tolerance only absorbs float32 rounding that may differ between ranks (another GPU model, a
  non-deterministic kernel, an all-reduce whose summation order differs per rank). A fingerprint
  computed in float32 moves from its float64 value by at most 6e-7 of the norm for 2^16..2^26
  elements (``benchmarks/desync_cost.py``: ~``sqrt(log2 n) * eps32``, random rounding over blocked
  reductions), so two summation orders differ by ~1e-6; summing ``W`` rank contributions in
  another order moves a gradient by ~``sqrt(W) * eps32`` (~4e-6 for 1024 ranks).
  :data:`REL_TOL` = ``2^-16`` ~ 1.5e-5 (128 float32 ulps) sits above both. A real desync is far
  above it: one step of different updates moves the replicas apart by the update-to-weight ratio
  (``lr * ||g_r - g|| / ||W||``, typically 1e-4..1e-2), and the gradients of the ``ddp.module`` bug
  differ by O(1) relative (each rank's own batch). Measured: after one skipped step of a 12.6 M-
  parameter MLP, 1.2e-3 (SGD lr 0.1) and 1.0e-2 (AdamW lr 1e-4); 8.5e-6 with SGD lr 1e-3, below the
  tolerance and left silent (70 ulps: the replicas are as good as equal); the tests' small MLP 0.27
  (skipped step) and 3.4 (``ddp.module``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch.detectors import Finding
from gradwatch.distributed import is_distributed, is_dtensor, local
from gradwatch.layers import Layer
from gradwatch.schema import DESYNC, ERROR

# 128 float32 ulps (2^-16 ~ 1.5e-5): above the rounding that may legitimately differ between
# replicas (a float32 fingerprint is within 6e-7 of its float64 value up to 2^26 elements, measured;
# ~sqrt(W) * eps32 ~ 4e-6 for an all-reduce over 1024 ranks in another order), below one optimizer
# step of different updates (update-to-weight ratios 1e-4..1e-2). See the module docstring.
REL_TOL = 2.0**-16
PROJECTIONS = 4  # rank-one projections: 10x the tolerance escapes all four in 0.3 % of rank-one cases
_SEED = 0x6D5EED  # fixed: every rank draws the same projection vectors
_MAX_NAMES = 8  # layers named in a message before "and N more"

SOURCE_GRAD = "grad"  # the gradients differ: the gradient reduction did not run
SOURCE_UNSHARDED = "grad_unsharded"  # the same, for plain parameters beside FSDP2-managed ones
SOURCE_PARAM = "param"  # the gradients agree but the parameters differ: the updates differed
SOURCE_START = "param_start"  # the parameters differ at the monitor's first comparison: different starts
SOURCE_STEP = "step"  # the ranks are not at the same step


@dataclass(frozen=True)
class _Tracked:
    """One parameter compared across ranks.

    Attributes:
        layer: index of its layer.
        param: the parameter (a DTensor under FSDP2: its local values are compared).
        groups: per rank of the default group, the id of the replica group it belongs to for this
            parameter (ranks with the same id must hold the same local values).
        u: ``(rows, K)`` left projection vectors.
        v: ``(cols, K)`` right projection vectors.
    """

    layer: int
    param: Tensor
    groups: tuple[int, ...]
    u: Tensor
    v: Tensor


@dataclass(frozen=True)
class Comparison:
    """What one comparison of the ranks' fingerprints found.

    Attributes:
        param_rel: per layer, the largest relative difference of its parameters between replicas.
        grad_rel: per layer, the same for the gradients (0 where no rank had a gradient).
        param_ranks: ranks whose parameters differ from the others' (all ranks of a replica group
            when no majority agrees).
        grad_ranks: the same for the gradients.
        steps: the step number each rank reported.
    """

    param_rel: list[float]
    grad_rel: list[float]
    param_ranks: tuple[int, ...]
    grad_ranks: tuple[int, ...]
    steps: tuple[int, ...]


def _matrix_shape(t: Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of ``t`` seen as a matrix: first dimension by the rest; a vector is ``1 x n``."""
    n = t.numel()
    if t.dim() >= 2 and t.shape[0] > 0:
        return t.shape[0], n // t.shape[0]
    return 1, n


def replica_groups(t: Tensor, world: int) -> tuple[int, ...] | None:
    """Per rank, the replica group that holds the same local values of ``t``; ``None`` when no two do.

    Plain tensors: one group of every rank. A DTensor: ranks at the same coordinate of its sharded
    mesh dimensions (of size > 1) share a group; ranks outside its mesh get ``-1``.
    """
    if not is_dtensor(t):
        return (0,) * world
    mesh = t.device_mesh  # type: ignore[attr-defined]
    ranks = mesh.mesh  # global ranks, shaped like the mesh
    sharded = [d for d, p in enumerate(t.placements) if not p.is_replicate() and ranks.size(d) > 1]  # type: ignore[attr-defined]
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in ranks.shape], indexing="ij"), dim=-1)
    gid = torch.zeros(ranks.shape, dtype=torch.long)
    for d in sharded:  # the linear index of the rank's coordinates on the sharded dimensions
        gid = gid * ranks.size(d) + coords[..., d]
    ids = [-1] * world
    for rank, g in zip(ranks.reshape(-1).tolist(), gid.reshape(-1).tolist()):
        if 0 <= rank < world:
            ids[rank] = g
    members: dict[int, int] = {}
    for g in ids:
        if g >= 0:
            members[g] = members.get(g, 0) + 1
    return tuple(ids) if any(c > 1 for c in members.values()) else None


def _projection_vectors(index: int, rows: int, cols: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(_SEED + 1_000_003 * index)  # never the global RNG
    uv = torch.randn(rows + cols, k, generator=gen, dtype=torch.float32)
    return uv[:rows].to(device), uv[rows:].to(device)


def compare(
    gathered: Tensor, groups: Sequence[tuple[int, ...]], layer_of: Sequence[int], n_layers: int, rtol: float
) -> Comparison:
    """Compare the ranks' fingerprints (a pure host function).

    Args:
        gathered: ``(world, 1 + 2 * P * C)`` float64: per rank, its step then per tracked parameter
            the parameter's fingerprint (``C`` values: norm, projections) and its gradient's (NaN
            where the rank had no gradient).
        groups: per tracked parameter, the replica group id of every rank (``-1``: not a holder).
        layer_of: per tracked parameter, its layer index.
        n_layers: number of layers.
        rtol: relative difference above which replicas differ.

    A value is compared with the component-wise median over its replica group (so a minority of
    deviating ranks is named against the majority), relative to the layer's norm (the root of the
    sum of its parameters' squared median norms). A rank whose
    value is not finite where others' are counts as infinitely different; where no rank has a
    finite value (no gradient anywhere, or non-finite everywhere) nothing is compared.
    """
    world = gathered.shape[0]
    steps = tuple(int(s) for s in gathered[:, 0].tolist())
    n = len(groups)
    f = gathered[:, 1:].reshape(world, n, 2, -1)
    diff = torch.zeros(world, n, 2, dtype=torch.float64)  # largest |value - group median| per rank
    norm = torch.zeros(n, 2, dtype=torch.float64)  # the group median of the norm
    by_partition: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(groups):
        by_partition.setdefault(tuple(g), []).append(i)
    blocks: list[tuple[Tensor, Tensor]] = []  # (member ranks, their parameters) of every replica group
    for partition, idx in by_partition.items():
        cols = torch.tensor(idx)
        members: dict[int, list[int]] = {}
        for r, gid in enumerate(partition):
            if gid >= 0:
                members.setdefault(gid, []).append(r)
        for rs in members.values():
            if len(rs) < 2:
                continue
            ranks = torch.tensor(rs)
            blocks.append((ranks, cols))
            sub = f[ranks][:, cols]  # (members, params, 2, C)
            finite = torch.isfinite(sub)
            clean = torch.where(finite, sub, torch.full_like(sub, float("nan")))
            med = clean.nanmedian(dim=0).values  # NaN where no member is finite
            d = (clean - med).abs()
            d = torch.where(finite, d, torch.full_like(d, math.inf))
            d = torch.where(med.isnan().expand_as(d), torch.zeros_like(d), d)
            diff[ranks[:, None], cols[None, :]] = d.amax(dim=-1)
            norm[cols] = torch.maximum(norm[cols], med[..., 0].nan_to_num(0.0).abs())
    # Relative to the layer's norm (all its parameters), not each parameter's own: a bias near zero
    # would otherwise turn a tiny absolute difference into a large relative one.
    layer_idx = torch.tensor(list(layer_of), dtype=torch.long)
    layer_sq = torch.zeros(n_layers, 2, dtype=torch.float64).index_add_(0, layer_idx, norm.square())
    scale = layer_sq.sqrt()[layer_idx]  # (n, 2)
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)  # x/0 = inf: a zero layer moved
    over = rel > rtol  # (world, n, 2)
    out_rel: list[list[float]] = []
    out_ranks: list[tuple[int, ...]] = []
    for which in (0, 1):
        per_param = rel[:, :, which].amax(dim=0)
        layer_rel = torch.zeros(n_layers, dtype=torch.float64).scatter_reduce_(0, layer_idx, per_param, "amax")
        involved: set[int] = set()
        for ranks, cols in blocks:
            o = over[ranks][:, cols, which]  # (members, params)
            n_dev = o.sum(dim=0)
            if bool((2 * n_dev >= len(ranks)).any()):
                involved.update(ranks.tolist())  # no majority left to compare with: every member is involved
            else:
                involved.update(ranks[o.any(dim=1)].tolist())
        out_rel.append(layer_rel.tolist())
        out_ranks.append(tuple(sorted(involved)))
    return Comparison(out_rel[0], out_rel[1], out_ranks[0], out_ranks[1], steps)


def _ranks_text(ranks: Sequence[int], world: int) -> str:
    if len(ranks) == world:
        return "between all ranks" if world > 2 else f"between ranks {ranks[0]} and {ranks[1]}"
    if len(ranks) == 1:
        return f"on rank {ranks[0]} (the other ranks agree)"
    return "on ranks " + ", ".join(str(r) for r in ranks) + " (the other ranks agree)"


def _layers_text(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    more = len(names) - _MAX_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


class DesyncCheck:
    """Compares the replicated parameters (and their gradients) across ranks on logging steps.

    Build it with :meth:`for_layers` (``None`` when there is nothing to compare); call
    :meth:`check` on every logging step, on every rank: it makes exactly one ``all_gather``.

    Args:
        layers: the monitor's layers.
        rtol: relative difference above which replicas differ (default :data:`REL_TOL`).
        projections: random projections per parameter (``K``).

    Raises:
        ValueError: ``rtol`` is not a positive finite number, or ``projections`` is not an int >= 1.
    """

    def __init__(self, layers: Sequence[Layer], *, rtol: float = REL_TOL, projections: int = PROJECTIONS) -> None:
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < math.inf:
            raise ValueError(f"`rtol` must be a positive finite number; got {rtol!r}")
        if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
            raise ValueError(f"`projections` must be an int >= 1; got {projections!r}")
        import torch.distributed as dist

        self.rtol = float(rtol)
        self.projections = projections
        self.world = dist.get_world_size() if is_distributed() else 1
        self.rank = dist.get_rank() if is_distributed() else 0
        self.layer_names = [layer.name for layer in layers]
        tracked: list[_Tracked] = []
        index = 0
        known: dict[Any, tuple[int, ...] | None] = {}  # by (mesh, placements): one walk of the mesh each
        # By name, not in the monitor's (forward) order: a forward order seen on one rank's first batch
        # could differ on another (data-dependent routing), and every rank must send the same layout.
        for li in sorted(range(len(layers)), key=lambda i: layers[i].name):
            layer = layers[li]
            for p in layer.params:
                key = (id(p.device_mesh), tuple(p.placements)) if is_dtensor(p) else None  # type: ignore[attr-defined]
                if key not in known:
                    known[key] = replica_groups(p, self.world)
                groups = known[key]
                # Every rank lists the same parameters (one payload layout); one outside the mesh sends
                # its empty local shard, which no group compares (its group id is -1).
                if groups is not None:
                    x = local(p)
                    rows, cols = _matrix_shape(x)
                    u, v = _projection_vectors(index, rows, cols, projections, x.device)
                    tracked.append(_Tracked(li, p, groups, u, v))
                index += 1  # counts every parameter: the same index for the same parameter on every rank
        self.tracked = tracked
        # FSDP2 manages (and reduces the gradients of) the DTensor parameters; a plain one beside them is
        # outside every fully_shard call.
        self.sharding = any(is_dtensor(p) for layer in layers for p in layer.params)
        self._plain_layers = {t.layer for t in tracked if not is_dtensor(t.param)}
        first = tracked[0].param if tracked else next((p for x in layers for p in x.params), None)
        self.device = local(first).device if first is not None else torch.device("cpu")
        self.last: Comparison | None = None
        self.checks = 0  # comparisons made
        self.largest = 0.0  # largest relative difference seen (parameters or gradients), over all checks

    @classmethod
    def for_layers(cls, layers: Sequence[Layer], **kwargs: float | int) -> DesyncCheck | None:
        """A check for these layers, or ``None`` when not distributed or no parameter has a replica."""
        if not is_distributed():
            return None
        check = cls(layers, **kwargs)  # type: ignore[arg-type]
        return check if check.tracked else None

    @property
    def projection_floats(self) -> int:
        """Floats held for the projection vectors (``K * (rows + cols)`` per compared parameter)."""
        return sum(t.u.numel() + t.v.numel() for t in self.tracked)

    def _sketch(self, x: Tensor | None, t: _Tracked) -> Tensor:
        """``[||x||, u_1^T X v_1, ..., u_K^T X v_K]`` in float32 (NaN without a tensor)."""
        if x is None:
            return torch.full((1 + self.projections,), float("nan"), device=self.device)
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()  # one parameter at a time: half types are projected in float32
        rows, cols = _matrix_shape(x)
        m = x.reshape(rows, cols)
        proj = ((m @ t.v) * t.u).sum(dim=0)
        # Row norms, then their norm: one float32 accumulation over all n elements (torch's CPU
        # vector_norm) drifts by ~n * eps32 (7e-4 relative at n = 2^24); rows then columns stay ~1e-7.
        norm = torch.linalg.vector_norm(torch.linalg.vector_norm(m, dim=1)).reshape(1)
        return torch.cat([norm, proj]).to(self.device)

    def fingerprint(self, step: int) -> Tensor:
        """This rank's fingerprints: ``[step, (param C values, grad C values) per parameter]``, float64."""
        rows = []
        with torch.no_grad():
            for t in self.tracked:
                rows.append(self._sketch(local(t.param), t))
                grad = t.param.grad
                rows.append(self._sketch(local(grad) if grad is not None else None, t))
        head = torch.tensor([float(step)], dtype=torch.float64, device=self.device)
        return torch.cat([head, torch.cat(rows).to(torch.float64)])

    def _gather(self, mine: Tensor) -> Tensor:
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and mine.device.type != "cuda":
            mine = mine.cuda()
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)  # the one collective of a logging step
        return torch.stack(out).cpu()

    def check(self, step: int) -> list[Finding]:
        """Compare every rank's replicas at logging step ``step`` (one ``all_gather``; every rank must call it).

        Returns:
            One ``desync`` :class:`Finding` when replicas differ (the same on every rank), else ``[]``.
        """
        gathered = self._gather(self.fingerprint(step))
        cmp = compare(
            gathered, [t.groups for t in self.tracked], [t.layer for t in self.tracked], len(self.layer_names),
            self.rtol,
        )
        self.last = cmp
        self.checks += 1
        self.largest = max(self.largest, *cmp.param_rel, *cmp.grad_rel)
        return self.findings(cmp, step)

    def findings(self, cmp: Comparison, step: int) -> list[Finding]:
        """The ``desync`` finding a comparison calls for (``[]`` when the replicas agree)."""
        if len(set(cmp.steps)) > 1:
            at = ", ".join(f"rank {r} at step {s}" for r, s in enumerate(cmp.steps))
            return [
                Finding(
                    kind=DESYNC,
                    source=SOURCE_STEP,
                    step=step,
                    layer=None,
                    value=float(max(cmp.steps) - min(cmp.steps)),
                    threshold=0.0,
                    severity=ERROR,
                    message=(
                        f"gradwatch: the ranks compared their replicas at different steps ({at}): their monitors "
                        "were not stepped the same number of times, so their collectives no longer pair up."
                    ),
                )
            ]
        grads = any(v > self.rtol for v in cmp.grad_rel)
        values, ranks = (cmp.grad_rel, cmp.grad_ranks) if grads else (cmp.param_rel, cmp.param_ranks)
        differing = sorted(
            (i for i, v in enumerate(values) if v > self.rtol), key=lambda i: (-values[i], i)
        )
        if not differing:
            return []
        names = [self.layer_names[i] for i in differing]
        worst = values[differing[0]]
        what = "gradients" if grads else "parameters"
        n = len(self.layer_names)
        head = (
            f"gradwatch: data-parallel replicas differ at step {step}: the {what} of {len(names)} of {n} layers "
            f"({_layers_text(names)}) differ {_ranks_text(ranks, self.world)}; largest relative difference "
            f"{worst:.2e} in layer {names[0]} (float32 tolerance {self.rtol:.1e})."
        )
        unsharded = grads and self.sharding and all(i in self._plain_layers for i in differing)
        start = not grads and self.checks <= 1
        if unsharded:
            tail = (
                " These layers are outside every fully_shard call, so FSDP2 never reduces their gradients: every "
                "rank trains its own copy of them."
            )
        elif grads:
            tail = (
                " The gradients were not reduced across ranks before the step (a forward through ddp.module "
                "instead of the DDP wrapper, or a no_sync() left on), so every rank trains its own copy of the model."
            )
        elif start:
            tail = (
                " Their gradients agree and this is the first comparison, before any update the monitor saw: the "
                "ranks started from different weights (initialisation without a broadcast, a checkpoint loaded on "
                "one rank only); every rank trains its own copy of the model."
            )
        else:
            tail = (
                " Their gradients agree, so the updates differed: a rank skipped or repeated an optimizer step, or "
                "the weights were changed on one rank only (initialisation without a broadcast, a load on one "
                "rank); every rank now trains its own copy of the model."
            )
        return [
            Finding(
                kind=DESYNC,
                source=(
                    SOURCE_UNSHARDED if unsharded else SOURCE_GRAD if grads else SOURCE_START if start else SOURCE_PARAM
                ),
                step=step,
                layer=None,
                value=float(worst),
                threshold=self.rtol,
                severity=ERROR,
                message=head + tail,
                layers=tuple(names),
                evidence=(("grad_rel", max(cmp.grad_rel)), ("param_rel", max(cmp.param_rel))),
            )
        ]


def remedies(source: str | None) -> tuple[str, ...]:
    """Ranked remedies for a ``desync`` finding from ``source``.

    ``"grad"``: the gradients differ (the DDP reduction did not run); ``"grad_unsharded"``: the
    gradients of plain parameters beside FSDP2-managed ones differ; ``"param"``: the gradients agree
    but the parameters differ; ``"param_start"``: the same at the monitor's first comparison (the
    ranks started apart); ``"step"``: the ranks are at different steps.
    """
    if source == SOURCE_UNSHARDED:
        return (
            "Call fully_shard on the modules named in the alert, or on the root module after its children "
            "(fully_shard(model)), so FSDP2 reduces their gradients too.",
            "If they must stay out of FSDP2 (ignored_params), all-reduce their gradients yourself before "
            "optimizer.step() (torch.distributed.all_reduce(p.grad, op=ReduceOp.AVG)).",
        )
    if source == SOURCE_STEP:
        return (
            "Step the monitor once per optimizer step on every rank: if one rank skips optimizer.step() "
            "(attach()/watch() run at the step), take the skip decision on all ranks together "
            "(all-reduce the flag) so every rank skips.",
        )
    fwd = (
        "Run the forward pass through the DistributedDataParallel wrapper (ddp(x)), never ddp.module(x): "
        "only the wrapper's forward arms the gradient all-reduce of the backward."
    )
    sync = (
        "Leave model.no_sync() only around the accumulation micro-batches: the last backward before "
        "optimizer.step() must run outside it."
    )
    step = (
        "Make every rank take every optimizer step: a skip decision (non-finite loss, a condition on the "
        "rank's own batch) must be agreed across ranks first (all-reduce the flag)."
    )
    init = (
        "Start every rank from the same weights: seed identically or broadcast rank 0's parameters "
        "(DDP does at construction; a module created or loaded after wrapping is not broadcast), and load "
        "checkpoints on every rank."
    )
    if source == SOURCE_GRAD:
        return (fwd, sync, step, init)
    return (init, step, fwd) if source == SOURCE_START else (step, init, fwd)
