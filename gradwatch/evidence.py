"""Evidence beyond the gradients: the optimizer, the size of the last update, the input scale, the loss.

The gradients say *that* training fails; these say *why*, and rank the remedies
(:mod:`gradwatch.remedies`). Everything here follows the house rule of the per-step path: device work
only, no host read outside logging steps.

* :func:`describe_optimizer` reads the optimizer's hyper-parameters (learning rate per param group,
  momentum or betas, weight decay) on the host, from ``param_groups``: at logging steps only, since a
  tensor learning rate would be a host read.
* :class:`UpdateTracker` measures the update-to-weight ratio ``||dw|| / ||w||`` per layer without a
  copy of the model: at a logging step it keeps a fixed sample of each parameter tensor (at most
  :data:`UPDATE_SAMPLE` entries, 4 KiB in float32: the whole tensor, or runs of 16 consecutive entries spread
  over it), and at the next step, once the optimizer has stepped, takes the same entries and compares.
  Extra memory: at most 8 KiB per parameter tensor, the samples before and after (a ResNet-50's 161
  tensors: < 1.3 MiB), whatever the model's size. The sample is an estimator: with 1024 entries its
  relative error on a ratio is a few percent, far below the two orders of magnitude the remedies look at.
* :class:`InputScale` records the RMS and max of the model's input (the first floating-point tensor
  its forward receives: what reaches the first layer, unless ``forward`` rescales it itself), with a
  forward pre-hook armed on logging steps only (not inside a ``torch.compile``'d forward).
* :class:`GradCarry` tells whether the gradient tensors the optimizer is about to apply are the same
  objects as last step's (host identity, no device work): a loop that zeroes with
  ``set_to_none=True`` (the default) hands new tensors every step, so carried-over gradients are
  impossible there. Only where the tensors are the same objects (``zero_grad(set_to_none=False)``, or
  no ``zero_grad`` at all) it samples the gradients for the ``accumulating`` detector.
* :class:`ReachProbe` tells, for layers whose gradient was exactly zero at a logging step, whether
  autograd reached them at all (a post-accumulate-grad hook): a stale zero gradient (a layer the loss
  never reaches, kept at zero by ``zero_grad(set_to_none=False)``) against an exactly zero gradient
  that backward did compute (dead units upstream, zero weights downstream).
"""

from __future__ import annotations

import collections
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch import schema
from gradwatch.layers import Layer, is_compiling

__all__ = [
    "UPDATE_SAMPLE",
    "AttentionProbe",
    "AttentionSample",
    "EvidenceSnapshot",
    "GradCarry",
    "GradSample",
    "GroupInfo",
    "InputScale",
    "OptimizerInfo",
    "ReachProbe",
    "UpdateTracker",
    "describe_optimizer",
    "optimized_layers",
]

#: Entries of each parameter tensor kept to measure the update-to-weight ratio (4 KiB in float32).
#: The ratio is estimated from a strided sample: 1024 entries give a few percent of relative error,
#: while the remedies compare it with thresholds two orders of magnitude apart (1e-3 healthy, 1e-1 too
#: large).
UPDATE_SAMPLE = 1024
#: Entries of each gradient tensor sampled per step when gradients are carried across steps: enough
#: for a cosine between consecutive gradients to within ~0.05 (1/sqrt(256) per tensor, averaged over
#: the tensors), only on loops whose gradient tensors persist across steps.
CARRY_SAMPLE = 256
#: A non-finite step at most this many steps after an ``exploding`` finding is where that explosion ended
#: (the detectors' persistence: an explosion that outruns it overflows within as many steps).
AFTER_EXPLODING = 3
_GRAD = operator.attrgetter("grad")
# Exploding's default max_ratio: a gradient above 50x its weights, not the step size, makes a large update.
_GRAD_EXPLODING = 50.0


def _float(x: Any) -> float | None:
    """A hyper-parameter as a float (a tensor is read to the host: call at logging steps only)."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        return float(x.detach().reshape(-1)[0]) if x.numel() else None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class GroupInfo:
    """One param group's hyper-parameters.

    Attributes:
        index: the group's index in ``optimizer.param_groups``.
        lr: learning rate (``None`` when the group has none).
        momentum: SGD/RMSprop momentum, ``None`` when the optimizer has none.
        betas: Adam-family betas, ``None`` when the optimizer has none.
        weight_decay: weight decay (0 when absent).
        layers: the layers with a parameter in this group, in layer order.
    """

    index: int
    lr: float | None
    momentum: float | None
    betas: tuple[float, ...] | None
    weight_decay: float
    layers: tuple[str, ...]


@dataclass(frozen=True)
class OptimizerInfo:
    """The optimizer gradwatch steps with, as the host sees it at a logging step.

    Attributes:
        name: the optimizer's class name (``"SGD"``, ``"AdamW"``).
        groups: its param groups.
        frozen: names of parameters the optimizer holds that do not require a gradient.
        trainable_held: number of the watched (trainable) parameters it holds.
    """

    name: str
    groups: tuple[GroupInfo, ...]
    frozen: tuple[str, ...] = ()
    trainable_held: int = 0

    def group_of(self, layer: str) -> GroupInfo | None:
        """The first group holding a parameter of ``layer``."""
        for g in self.groups:
            if layer in g.layers:
                return g
        return None

    def lr_of(self, layer: str | None = None) -> float | None:
        """The learning rate of ``layer``'s group (the largest of all groups when ``layer`` is ``None``)."""
        if layer is not None:
            g = self.group_of(layer)
            if g is not None:
                return g.lr
        lrs = [g.lr for g in self.groups if g.lr is not None]
        return max(lrs) if lrs else None

    def describe(self, layer: str | None = None) -> str:
        """``"SGD lr 3"``, ``"Adam lr 0.001"``, with momentum where set: what a remedy quotes."""
        lr = self.lr_of(layer)
        text = self.name + (f" lr {lr:.3g}" if lr is not None else "")
        g = self.group_of(layer) if layer is not None else (self.groups[0] if self.groups else None)
        if g is not None and g.momentum:
            text += f" momentum {g.momentum:.3g}"
        return text

    @property
    def inert(self) -> bool:
        """Whether it holds parameters but none that gets a gradient (only frozen ones)."""
        return bool(self.frozen) and self.trainable_held == 0


def describe_optimizer(
    optimizer: torch.optim.Optimizer, layers: Sequence[Layer], model: nn.Module | None = None
) -> OptimizerInfo:
    """Read ``optimizer``'s hyper-parameters and which layers it updates (host; logging steps only).

    Args:
        optimizer: the optimizer.
        layers: the watched layers (trainable parameters).
        model: the model, to name the frozen parameters the optimizer holds.
    """
    return _describe(optimizer, _holdings(optimizer, layers, model))


#: ``||g||`` and ``||w||`` per layer at one logging step (host).
_NormPair = tuple[Sequence[float], Sequence[float]]
#: Which watched layers each param group holds, the names of the frozen parameters held, the watched parameters held.
_Holdings = tuple[tuple[tuple[str, ...], ...], tuple[str, ...], int]


def _holdings(optimizer: torch.optim.Optimizer, layers: Sequence[Layer], model: nn.Module | None) -> _Holdings:
    """What ``optimizer``'s param groups hold (host; a walk of every parameter): changes only with the groups."""
    layer_of = {id(p): x.name for x in layers for p in x.params}
    per_group = []
    held = 0
    frozen_ids: list[int] = []
    for g in optimizer.param_groups:
        names: list[str] = []
        for p in g["params"]:
            name = layer_of.get(id(p))
            if name is not None:
                held += 1
                if name not in names:
                    names.append(name)
            elif not p.requires_grad:
                frozen_ids.append(id(p))
        per_group.append(tuple(names))
    frozen: tuple[str, ...] = ()
    if frozen_ids and model is not None:
        ids = set(frozen_ids)
        frozen = tuple(n for n, p in model.named_parameters() if id(p) in ids)
    elif frozen_ids:
        frozen = tuple(f"<parameter {i}>" for i in range(len(frozen_ids)))
    return tuple(per_group), frozen, held


def _describe(optimizer: torch.optim.Optimizer, holdings: _Holdings) -> OptimizerInfo:
    """``optimizer``'s hyper-parameters as they are now (host), with what its groups hold."""
    per_group, frozen, held = holdings
    groups = []
    for i, (g, names) in enumerate(zip(optimizer.param_groups, per_group)):
        betas = g.get("betas")
        groups.append(
            GroupInfo(
                index=i,
                lr=_float(g.get("lr")),
                momentum=_float(g.get("momentum")) if "momentum" in g else None,
                betas=tuple(float(b) for b in betas) if isinstance(betas, (tuple, list)) else None,
                weight_decay=_float(g.get("weight_decay")) or 0.0,
                layers=names,
            )
        )
    return OptimizerInfo(type(optimizer).__name__, tuple(groups), frozen, held)


def optimized_layers(optimizer: torch.optim.Optimizer, layers: Sequence[Layer]) -> tuple[bool, ...]:
    """For each layer, whether ``optimizer`` holds one of its parameters (host; no tensor read)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return tuple(any(id(p) in held for p in x.params) for x in layers)


def _local(t: Tensor) -> Tensor:
    """``t`` detached (a DTensor by its local shard)."""
    to_local = getattr(t, "to_local", None)
    if callable(to_local):
        t = to_local()
    return t.detach()


def _flat(t: Tensor) -> Tensor:
    """``t`` as 1-D (a view for contiguous tensors; DTensors by their local shard)."""
    return _local(t).reshape(-1)


#: Consecutive entries in one run of a sample: 16 float32 are 64 bytes, one cache line.
RUN = 16


@dataclass(frozen=True)
class _Piece:
    """How one tensor is sampled: every entry, or ``runs`` runs of ``run`` consecutive entries ``stride`` apart.

    Attributes:
        layer: the index of the tensor's layer.
        numel: the tensor's entries.
        runs: the runs sampled (0: every entry, in order).
        run: entries per run.
        stride: entries from the start of one run to the next (a multiple of ``run``).
    """

    layer: int
    numel: int
    runs: int = 0
    run: int = 0
    stride: int = 0

    @property
    def size(self) -> int:
        """Sampled entries."""
        return self.runs * self.run if self.runs else self.numel

    def view(self, flat: Tensor) -> Tensor:
        """The sampled entries of ``flat`` (the tensor as 1-D): ``flat`` itself, or a ``(runs, run)`` view of it."""
        if not self.runs:
            return flat
        return flat.as_strided((self.runs, self.run), (self.stride, 1))


def _plan(layer: int, shape: Sequence[int], per_tensor: int) -> _Piece:
    """The sample of a tensor of ``shape``: every entry up to ``per_tensor`` entries, else runs spread over it.

    A larger tensor gives ``per_tensor // run`` runs of ``run = min(RUN, per_tensor)`` consecutive entries, the
    first at entry 0, ``stride`` apart: the largest stride that fits them all in the tensor and makes the runs'
    start columns in a row (``row``: the entries after the first dimension) at most ``run`` apart, i.e.
    ``gcd(stride, row) <= run``, so that the runs together cover every column. Where that largest stride is at
    least 16 runs long it is a multiple of ``run`` (every run one whole cache line in float32, the storage being
    aligned), which leaves at most the last 1/16 of the tensor's span unsampled; a smaller tensor (a few
    hundred cache lines) keeps the full spread, each run then crossing at most one line boundary.
    """
    n = math.prod(shape)
    if n <= per_tensor:
        return _Piece(layer, n)
    run = min(RUN, per_tensor)
    runs = per_tensor // run
    if runs == 1:
        return _Piece(layer, n, 1, run, run)
    widest = (n - run) // (runs - 1)  # >= run, since n > per_tensor >= runs * run
    step = run if widest >= 16 * run else 1
    stride = widest // step * step
    row = n // shape[0] if len(shape) >= 2 else n
    if row < n:
        while stride > step and math.gcd(stride, row) > run:
            stride -= step
    return _Piece(layer, n, runs, run, stride)


class _Kept:
    """The sample views of one set of tensors (weights, or gradients), kept while their storages stay."""

    def __init__(self) -> None:
        self.ptrs: list[int] | None = None  # data pointers the views were made from (None: remake at every call)
        self.runs: list[Tensor] = []  # (runs, run) views of the tensors sampled by runs
        self.whole: list[Tensor] = []  # 1-D views of the tensors sampled whole
        self.convert = False  # whether the joined sample needs a conversion to float32 on the sampler's device


_DATA_PTR = Tensor.data_ptr  # the C method itself: no attribute lookup per tensor
#: Entries per row of the grid: the tensors sampled by runs and those sampled whole whose size is a multiple of it
#: lie side by side in rows of this many entries (4 cache lines in float32), whose norms are one vectorised
#: reduction whatever the tensors' sizes and number.
GRID = 64
#: Sizes of tensors sampled whole off the grid that get a reduction of their own (the sizes with the most entries);
#: the tensors of other sizes are summed by one segment reduction (4 ops). Bounds the ops of a measure whatever the
#: model.
SIZE_GROUPS = 4


@dataclass(frozen=True)
class _Block:
    """Consecutive tensors of one sample size: entries ``[start, start + count * size)``, columns ``[first, ...)``."""

    start: int
    first: int
    count: int
    size: int


class _Sampler:
    """A fixed sample of every parameter tensor (or its gradient), with the layer of each entry.

    A tensor of at most ``per_tensor`` entries is sampled whole. A larger one is sampled as ``per_tensor // 16``
    runs of 16 consecutive entries (a 64-byte cache line in float32), spread evenly over its span at a stride
    whose runs start in every part of a row (:func:`_plan`). Single entries at a stride would cost a cache line
    each (a 512x512 weight's stride is 1 KiB): the runs read 16 times fewer lines for the same entries, and
    their views copy as 16-entry rows, which is what keeps a sample cheap.

    The sample is representative of the tensor: its runs cover the rows (units) evenly and every column (input
    feature) of a row, so a feature the data leaves at zero or a block of dead units is sampled in its
    proportion. A ratio of sums of squares over it (the update-to-weight ratio) has a relative error of order
    ``1/sqrt(entries)`` (~4% for 1024) where the entries vary alike, and at most ``c/sqrt(runs)`` (``c/8`` for
    64 runs) where whole units differ in scale with a coefficient of variation ``c``: far below the two orders
    of magnitude between the thresholds the detectors and remedies compare it with.

    Layout (:attr:`pieces`, :attr:`params`; :attr:`index` names each entry's layer): first the grid, reduced as
    rows of :attr:`width` entries (a multiple of :data:`GRID` for samples of 1024 or 256), one vector norm for them
    all: every tensor sampled by runs, joined by one ``cat`` of their ``(runs, 16)`` views, then every tensor sampled
    whole whose size is a multiple of :data:`GRID`, each in parameter order. Then the other tensors sampled whole (odd
    sizes: a classifier's bias): those of the :data:`SIZE_GROUPS` sizes with the most entries first, one size after
    the other, then the rest, each in parameter order. The tensors sampled whole are joined by one ``cat`` of
    contiguous flat views (a ``cat`` of contiguous tensors copies each in one piece; one strided input would make it
    copy all of them entry by entry). Tensors off the grid of one size lie side by side (:attr:`blocks`), so their
    norms are one vectorised reduction of a ``(count, size)`` view; the rest (:attr:`rest`) take one segment
    reduction. A reduction's outputs are *columns*: one per grid row, then one per tensor off the grid
    (:attr:`columns`, the layer of each in :attr:`column_layer`).

    Args:
        layers: the watched layers.
        per_tensor: at most this many entries per tensor.
        device: where the sample goes.
    """

    def __init__(self, layers: Sequence[Layer], per_tensor: int, device: torch.device) -> None:
        self.device = device
        #: Entries of a run (the rows of the ``cat`` that joins the grid).
        self.run = min(RUN, per_tensor)
        width = math.gcd(GRID, per_tensor // self.run * self.run)
        width = width if width % self.run == 0 else self.run
        found: list[tuple[_Piece, nn.Parameter]] = []
        for i, layer in enumerate(layers):
            for p in layer.params:
                shape = _local(p).shape  # the local shard's under FSDP2 (what is sampled)
                if math.prod(shape) > 0:
                    found.append((_plan(i, shape, per_tensor), p))
        sizes = {f.size for f, _ in found if f.runs or f.numel % width == 0}
        #: Entries per row of the grid: the widest rows (the fastest reduction) holding the same tensors as rows of
        #: :data:`GRID`: the greatest common divisor of their sample sizes (a whole number of runs).
        self.width = math.gcd(*sizes) if sizes else width
        runs = [fp for fp in found if fp[0].runs]
        grid = runs + [fp for fp in found if not fp[0].runs and fp[0].numel % self.width == 0]
        flat = [fp for fp in found if not (fp[0].runs or fp[0].numel % self.width == 0)]
        count = collections.Counter(f.size for f, _ in flat)
        shared = sorted(count, key=lambda s: (-s * count[s], s))[:SIZE_GROUPS]
        rank = {s: i for i, s in enumerate(shared)}
        flat.sort(key=lambda fp: rank.get(fp[0].size, len(shared)))  # stable: parameter order within a size
        found = grid + flat
        self.pieces: list[_Piece] = [f for f, _ in found]
        self.params: list[nn.Parameter] = [p for _, p in found]
        self._n_runs = len(runs)
        self._n_grid = len(grid)
        #: Entries of the tensors sampled by runs (the first ones of the sample).
        self.run_entries = sum(f.size for f, _ in runs)
        #: Entries of the grid (the first ones of the sample).
        self.grid_entries = sum(f.size for f, _ in grid)
        self.entries = sum(f.size for f in self.pieces)
        #: Rows of the grid: its columns.
        self.rows = self.grid_entries // self.width
        blocks: list[_Block] = []
        start, first = self.grid_entries, self.rows
        for s in shared:
            blocks.append(_Block(start, first, count[s], s))
            start, first = start + count[s] * s, first + count[s]
        #: Tensors off the grid of one size side by side: each shared size.
        self.blocks: tuple[_Block, ...] = tuple(blocks)
        #: ``(first entry, first column)`` of the tensors off the grid in no block.
        self.rest: tuple[int, int] = (start, first)
        self._rest_sizes = [f.size for f in self.pieces[self._n_grid + sum(b.count for b in blocks) :]]
        #: Columns of a reduction: the grid's rows, then one per tensor off the grid.
        self.columns = first + len(self._rest_sizes)
        # A DTensor holds no storage of its own (a new local view every step): its views are remade every call.
        self._plain = not any(callable(getattr(p, "to_local", None)) for p in self.params)
        grid_layers = [f.layer for f in self.pieces[: self._n_grid] for _ in range(f.size // self.width)]
        #: long[columns]: the layer of each column.
        self.column_layer = torch.tensor(
            grid_layers + [f.layer for f in self.pieces[self._n_grid :]], dtype=torch.long, device=device
        )
        self._index: Tensor | None = None
        # segment_reduce has CPU and CUDA kernels; on other devices the rest's sums go entry by entry (index_add).
        self.segmented = device.type in ("cpu", "cuda")
        self._weights = _Kept()

    @property
    def index(self) -> Tensor:
        """long[entries]: the layer of each sampled entry (made at the first use)."""
        if self._index is None:  # made on the host: a repeat_interleave on the device would read its size back
            layers = torch.tensor([f.layer for f in self.pieces], dtype=torch.long)
            self._index = torch.repeat_interleave(layers, torch.tensor([f.size for f in self.pieces])).to(self.device)
        return self._index

    def _views(self, tensors: Sequence[Tensor | None], kept: _Kept) -> _Kept:
        """``kept``, its views remade unless every tensor's data pointer is the one they were made from.

        A contiguous tensor's sample is a view of its storage, so it follows in-place updates (the
        optimizer's); a tensor given new storage (``p.data = ...``, ``model.to(...)``) has a new data pointer
        (the kept view holds the old storage, so no new one can take its address) and its view is remade. The
        check is one data pointer per tensor on the host. A non-contiguous tensor's sample is a copy, made
        afresh at every call.
        """
        ptrs: list[int] | None = None
        if self._plain:
            try:
                ptrs = list(map(_DATA_PTR, tensors))
            except TypeError:  # a parameter without a gradient
                ptrs = [t.data_ptr() if t is not None else 0 for t in tensors]
        if ptrs is None or kept.ptrs != ptrs:
            kept.ptrs = ptrs if self._remake(tensors, kept) else None
        return kept

    def _remake(self, tensors: Sequence[Tensor | None], kept: _Kept) -> bool:
        """Make ``kept``'s views of ``tensors``; whether they are views that can be kept."""
        views: list[Tensor] = []
        keep = True
        for f, t in zip(self.pieces, tensors):
            if t is None:
                views.append(torch.zeros((f.runs, f.run) if f.runs else (f.numel,), device=self.device))
                continue
            local = _local(t)
            keep = keep and local.is_contiguous()
            views.append(f.view(local.reshape(-1)))
        if any(v.device != self.device for v in views):  # a model on (or split over) other devices: copies
            views = [v.to(self.device) for v in views]
            keep = False
        kept.runs, kept.whole = views[: self._n_runs], views[self._n_runs :]
        kept.convert = any(v.dtype != torch.float32 for v in views)
        return keep

    def take(self, tensors: Sequence[Tensor | None], kept: _Kept | None = None) -> Tensor:
        """The sampled entries of ``tensors`` (one per parameter, as :attr:`params`), as a new float32 vector.

        ``None`` (a parameter without a gradient) samples as zeros. With ``kept``, the views made at the last
        call are reused while the tensors' storages stay (:meth:`_views`).
        """
        if not self.pieces:
            return torch.zeros(0, device=self.device)
        kept = self._views(tensors, kept if kept is not None else _Kept())
        parts = []
        if kept.runs:
            parts.append(torch.cat(kept.runs).view(-1))
        if kept.whole:
            parts.append(torch.cat(kept.whole))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out.to(torch.float32) if kept.convert else out

    def weights_into(self, runs: Tensor, whole: Tensor) -> None:
        """Write the sampled weights into ``runs`` (float32[run_entries / run, run]) and ``whole``: one ``cat`` each.

        The two are the parts of one float32[entries] vector, as :meth:`take` lays it out (a ``cat`` converts to
        their dtype).
        """
        kept = self._views(self.params, self._weights)
        if kept.runs:
            torch.cat(kept.runs, out=runs)
        if kept.whole:
            torch.cat(kept.whole, out=whole)

    def weights(self) -> Tensor:
        """The sampled weights: :meth:`take` of every parameter, with views kept across calls."""
        return self.take(self.params, self._weights)

    def squares(self, x: Tensor, out: Tensor) -> Callable[[], None]:
        """A call writing into ``out`` (float32[..., columns]) the sum of squares of each column of ``x`` (float32[...,
        entries], the same leading shape; views of kept buffers, so the call is made once and run at every use).

        One vector norm for the grid's rows, one per block (then all squared in place), and for the rest one segment
        reduction of the squares (an ``index_add`` entry by entry where ``segment_reduce`` has no kernel): a fixed
        number of ops whatever the number of layers.
        """
        lead = tuple(x.shape[:-1])
        norms = [
            (
                x[..., b.start : b.start + b.count * b.size].view(*lead, b.count, b.size),
                out[..., b.first : b.first + b.count],
            )
            for b in self.blocks
        ]
        if self.rows:
            norms.insert(0, (x[..., : self.grid_entries].view(*lead, self.rows, self.width), out[..., : self.rows]))
        start, first = self.rest
        grouped = out[..., :first]
        rest_x, rest_out = x[..., start:], out[..., first:]
        k = math.prod(lead)
        lengths = torch.tensor(self._rest_sizes * k, dtype=torch.long, device=self.device)
        rest_index = None
        if not self.segmented and self._rest_sizes:
            pieces = torch.arange(len(self._rest_sizes), dtype=torch.long)
            rest_index = torch.repeat_interleave(pieces, torch.tensor(self._rest_sizes)).to(self.device)

        def run() -> None:
            for src, dst in norms:
                torch.linalg.vector_norm(src, dim=-1, out=dst)
            if norms:
                grouped.square_()
            if not self._rest_sizes:
                return
            if rest_index is None:
                # unsafe: the lengths are ours and right; the check would read them back to the host (a GPU sync)
                sums = torch.segment_reduce(rest_x.square().view(-1), "sum", lengths=lengths, unsafe=True)
                rest_out.copy_(sums.view(rest_out.shape))
            else:
                rest_out.zero_().index_add_(rest_out.dim() - 1, rest_index, rest_x.square())

        return run

    @property
    def extra_bytes(self) -> int:
        """Bytes of the entry-by-entry piece index of the rest, where there is no ``segment_reduce``."""
        return 0 if self.segmented else 8 * sum(self._rest_sizes)


class UpdateTracker:
    """The update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` per layer, on logging steps.

    :meth:`snapshot` (at a logging step, before ``optimizer.step()``) keeps a sample of every parameter tensor,
    at most :data:`UPDATE_SAMPLE` entries each (every entry of a smaller tensor; runs of 16 consecutive entries
    spread over a larger one, see :class:`_Sampler`); :meth:`measure` (at the next step, after the optimizer
    has stepped) takes the same entries again and compares. The ratio is that of the sums of squares over the
    sampled entries of each layer's tensors. A common healthy heuristic is ~1e-3 per step; 1e-1 means the step
    replaces a tenth of the weights.

    Both samples live in one float32[2, entries] buffer made at the first snapshot and kept, one row each. A
    snapshot is two ``cat`` ops (the grid, the tensors off it) into the row of the weights before the update and
    the sums of squares of its columns, summed per layer (``||w_before||^2``), and ``0 / ||w_before||^2`` (0, or NaN
    where the weights are zero). A measure is two ``cat`` ops into the other row, a subtraction in place (the
    update), one norm of the grid's rows and one per block of equally sized tensors off it, over both rows at once
    (:meth:`_Sampler.squares`: ``||w_after||^2`` and ``||dw||^2`` per column), a sum per layer into one of two kept
    outputs (taken in turn, so the last measure's ``||w_after||^2`` stays while the next is summed), and the ratio as
    ``sqrt(0 / ||w||^2 + ||dw||^2 / ||w||^2)`` (one ``addcdiv``, NaN where the weights were zero, and a square
    root): a fixed number of ops whatever the number of layers. A snapshot taken with the weights the last measure
    sampled (``same_weights``: a logging step right after the measure, ``log_every=1``) takes that sample and its
    sums as they are; ``0 / ||w_after||^2`` is made by the measure where the snapshot before it was of that kind
    too (in a run of them, the measure's ops run together), else by the snapshot: one op either way.

    Args:
        layers: the watched layers.
        device: where the ratio is computed.
        per_tensor: sampled entries per parameter tensor.
    """

    def __init__(self, layers: Sequence[Layer], device: torch.device, per_tensor: int = UPDATE_SAMPLE) -> None:
        self.n = len(layers)
        self._sampler = _Sampler(layers, per_tensor, device)
        self._buf: _Buffer | None = None  # made at the first snapshot
        self._before = 1  # the row of ``_buf`` holding the weights before the update
        self._turn = 0  # the kept output of the last measure's per-layer sums
        self._w2: Tensor | None = None  # float32[L]: ||w_before||^2 per layer
        self._zero_w: Tensor | None = None  # float32[L]: 0 where ||w_before||^2 > 0, NaN where it is 0 (0 / 0)
        self._chained = False  # whether the last snapshot took the sample of the measure before it
        self._zero_after = False  # whether the last measure made 0 / ||w_after||^2 (for a snapshot of its weights)
        self._after: Tensor | None = None  # float32[L]: ||w_after||^2 per layer of the last measure, while current
        self._step: int | None = None

    @property
    def memory_bytes(self) -> int:
        """Bytes kept once the first snapshot is taken: two float32 samples (before and after an update), plus
        the 8-byte piece index of the entries summed entry by entry where there is no ``segment_reduce`` (a few
        figures per tensor and per layer besides)."""
        return self._sampler.entries * 2 * 4 + self._sampler.extra_bytes

    @property
    def pending(self) -> bool:
        """Whether a snapshot waits for its measure."""
        return self._step is not None

    def _buffer(self) -> _Buffer:
        if self._buf is None:
            self._buf = _Buffer(self._sampler, self.n)
        return self._buf

    def snapshot(self, step: int, same_weights: bool = False) -> None:
        """Keep the sample of the weights as they are before ``step``'s optimizer step (device work only).

        Args:
            step: the step whose update the next :meth:`measure` measures.
            same_weights: the weights are as the last :meth:`measure` sampled them (no optimizer step and no
                new storage since, e.g. the same monitor step): its sample is kept as the one before the update.
        """
        buf = self._buffer()
        if same_weights and self._after is not None:
            self._before, self._w2 = 1 - self._before, self._after
            if not self._zero_after:  # the measure made it where the last snapshot was of its weights too
                torch.div(buf.zeros1, self._w2, out=buf.zero_w)
            self._chained = True
        else:
            b = self._before
            self._sampler.weights_into(*buf.parts[b])
            buf.row_squares[b]()
            self._w2 = buf.zeros1.index_add(0, self._sampler.column_layer, buf.sq1)
            torch.div(buf.zeros1, self._w2, out=buf.zero_w)
            self._chained = False
        self._zero_w = buf.zero_w
        self._after = None
        self._zero_after = False
        self._step = step

    def state_dict(self) -> dict[str, Any] | None:
        """The snapshot waiting for its measure (``None`` when none waits), for a checkpoint.

        A checkpoint taken between a snapshot and its measure (right after a logging step that sampled the
        weights) carries the sample, so the resumed run measures that update as the uninterrupted one would.
        """
        if self._step is None or self._buf is None or self._w2 is None or self._zero_w is None:
            return None
        return {
            "step": self._step,
            "entries": self._sampler.entries,
            "sample": self._buf.rows[self._before].detach().cpu().clone(),
            "w2": self._w2.detach().cpu().clone(),
            "zero_w": self._zero_w.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; a sample of another layout (another model) is dropped: nothing to measure."""
        self._step = None
        if not state or int(state["entries"]) != self._sampler.entries or len(state["w2"]) != self.n:
            return
        buf = self._buffer()
        dev = buf.buf.device
        buf.rows[self._before].copy_(state["sample"].to(dev))
        buf.zero_w.copy_(state["zero_w"].to(dev))
        self._zero_w = buf.zero_w
        self._w2 = state["w2"].to(dev, torch.float32).clone()
        self._chained, self._zero_after, self._after = False, False, None
        self._step = int(state["step"])

    def measure(self) -> tuple[int, Tensor] | None:
        """``(step, ratio[L])`` of the update applied since :meth:`snapshot`, or ``None`` without one.

        The ratio is NaN for layers whose sampled weights were all zero (zero-initialised).
        """
        if self._step is None or self._buf is None or self._w2 is None or self._zero_w is None:
            return None
        step, self._step = self._step, None
        buf, b = self._buf, self._before
        a = 1 - b
        self._sampler.weights_into(*buf.parts[a])
        buf.rows[b].sub_(buf.rows[a])  # the update (negated), in the row of the weights before it
        buf.both_squares()
        self._turn = t = 1 - self._turn
        torch.index_add(buf.zeros2, 1, self._sampler.column_layer, buf.sq2, out=buf.sums[t])
        self._after, d2 = buf.sum_rows[t][a], buf.sum_rows[t][b]
        # ||dw||^2 / ||w||^2 plus 0, or NaN where ||w||^2 is 0: one op for the quotient and its undefined cases
        ratio = torch.addcdiv(self._zero_w, d2, self._w2).sqrt_()
        if self._chained:  # log_every=1: the next snapshot takes these weights; their 0 / ||w||^2, made here
            torch.div(buf.zeros1, self._after, out=buf.zero_w)
            self._zero_after = True
        return step, ratio


class _Buffer:
    """The kept buffers of an :class:`UpdateTracker`: both samples, the sums of squares per column, their views."""

    def __init__(self, sampler: _Sampler, n_layers: int) -> None:
        dev = sampler.device
        e, r, c = sampler.entries, sampler.run_entries, sampler.columns
        self.buf = torch.zeros(2, e, device=dev)
        self.rows = (self.buf[0], self.buf[1])
        # Each row's runs and whole parts, the outputs of the two cat ops.
        self.parts = tuple((row[:r].view(-1, sampler.run), row[r:]) for row in self.rows)
        self.sq2 = torch.zeros(2, c, device=dev)  # sums of squares per column of both rows
        self.sq1 = torch.zeros(c, device=dev)  # of one row
        self.zeros2 = torch.zeros(2, n_layers, device=dev)
        self.zeros1 = torch.zeros(n_layers, device=dev)
        self.zero_w = torch.zeros(n_layers, device=dev)  # the snapshot's 0 / ||w_before||^2
        # A measure's per-layer sums of both rows, in one of two outputs taken in turn; the rows' views.
        sums = torch.zeros(2, 2, n_layers, device=dev)
        self.sums = (sums[0], sums[1])
        self.sum_rows = tuple((s[0], s[1]) for s in self.sums)
        self.both_squares = sampler.squares(self.buf, self.sq2)
        self.row_squares = tuple(sampler.squares(row, self.sq1) for row in self.rows)


class InputScale:
    """RMS and max |x| of the input reaching ``module`` (the first weight layer), on logging steps.

    A forward pre-hook, armed by ``armed()`` (the coming forward precedes a logging step), reduces the
    first floating-point tensor among the module's inputs on the device. Integer inputs (token ids)
    are skipped: an embedding's input has no scale.

    Args:
        module: the module whose input is measured.
        name: its layer name (quoted by remedies).
        device: where the figures are kept.
        armed: whether the coming forward precedes a logging step.
    """

    def __init__(self, module: nn.Module, name: str, device: torch.device, armed: Callable[[], bool]) -> None:
        self.name = name
        self.device = device
        self._armed = armed
        self._value: Tensor | None = None
        self._taken = False
        self.batch_size: int | None = None  # leading dimension of the last measured input (host: a shape)
        self._handle: RemovableHandle | None = None
        self.retarget(module, name)

    def retarget(self, module: nn.Module, name: str) -> None:
        """Measure the input of ``module`` from now on (the first weight layer in forward order)."""
        if self._handle is not None:
            self._handle.remove()
        self.name = name
        ref = weakref.ref(self)

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if is_compiling():  # inside torch.compile: a no-op (a branch on the step would recompile every arm)
                return
            me = ref()
            if me is None or me._taken or not me._armed():
                return
            x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()), None)
            if x is None or x.numel() == 0:
                return
            me.batch_size = int(x.shape[0]) if x.dim() >= 2 else None
            with torch.no_grad():
                xf = x.detach().to(torch.float32)
                me._value = torch.stack([xf.square().mean().sqrt(), xf.abs().amax()]).to(me.device)
            me._taken = True

        self._handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def take(self) -> Tensor | None:
        """float32[2] (RMS, max |x|) recorded since the last take, or ``None``."""
        v, self._value, self._taken = self._value, None, False
        return v

    def remove(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# Attention q/k projections, in pairs of sibling modules (the names remedies recognise as q/k).
_QK_PAIRS = (("q", "k"), ("query", "key"), ("q_proj", "k_proj"), ("wq", "wk"), ("to_q", "to_k"), ("q_lin", "k_lin"))
#: Query rows whose scores are formed: the first samples of the batch, up to 512 rows (512 positions of one
#: sample at most: a 512 x 512 matrix, 1 MiB in float32).
ATTENTION_POSITIONS = 512


@dataclass
class AttentionSample:
    """How much gradient the softmax of each attention (q, k) pair passes, measured at a logging step.

    Attributes:
        pairs: ``(q module, k module)`` names, one per pair.
        passing: float32[P], the trace of the softmax's Jacobian ``diag(p) - p p^T``, i.e. ``1 - sum(p^2)``,
            over its largest value ``1 - 1/n`` (a uniform attention over ``n`` keys), averaged over the query
            rows, with the scores taken as ``q @ k.T / d``: 1 for a uniform attention, ~0 for a one-hot one
            (NaN: the pair did not run).
    """

    pairs: tuple[tuple[str, str], ...]
    passing: Tensor


def attention_pairs(model: nn.Module) -> list[tuple[str, str, nn.Module, nn.Module]]:
    """Sibling ``nn.Linear`` q/k projections of ``model`` (``q``/``k``, ``q_proj``/``k_proj``, ...)."""
    mods = dict(model.named_modules())
    out = []
    for name, m in mods.items():
        if not isinstance(m, nn.Linear) or not name:
            continue
        parent, _, leaf = name.rpartition(".")
        for qn, kn in _QK_PAIRS:
            if leaf.lower() != qn:
                continue
            k_name = f"{parent}.{leaf[: len(leaf) - len(qn)]}{kn}" if parent else kn
            k_name = next((n for n in mods if n.lower() == k_name.lower() and isinstance(mods[n], nn.Linear)), "")
            if k_name:
                out.append((name, k_name, m, mods[k_name]))
    return out


class AttentionProbe:
    """Softmax saturation of hand-written attention, from its q/k projections' outputs, on logging steps.

    Forward hooks on each (q, k) pair of sibling ``nn.Linear`` modules (:func:`attention_pairs`), armed by
    ``armed()`` (the coming forward precedes a logging step), keep the first samples' projections (at most
    :data:`ATTENTION_POSITIONS` query rows); :meth:`take` forms the scores ``q @ k.T / d`` and measures how
    much gradient their softmax passes (:class:`AttentionSample`).

    The forward's own scale is not visible, so the scores are divided by ``d`` (the projections' width):
    no smaller than any scale in use (``1/sqrt(d_head)``, or muP's ``1/d_head``), and all heads summed in one
    dot product grow it by at most ``sqrt(heads)``. The figure is a lower bound on the real saturation: a
    pair it calls saturated saturates in any of those scalings, and a healthy attention (scores of unit
    scale) sits far below. Nothing runs on other steps; under ``torch.compile`` the hooks are no-ops.

    Args:
        model: the watched model.
        device: where the figures are kept.
        armed: whether the coming forward precedes a logging step.
    """

    def __init__(self, model: nn.Module, device: torch.device, armed: Callable[[], bool]) -> None:
        found = attention_pairs(model)
        self.pairs = tuple((q, k) for q, k, _, _ in found)
        self.device = device
        self._armed = armed
        self._out: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        ref = weakref.ref(self)
        for q, k, qm, km in found:
            for name, mod in ((q, qm), (k, km)):
                self._handles.append(mod.register_forward_hook(self._hook(ref, name)))

    @staticmethod
    def _hook(ref: weakref.ref[AttentionProbe], name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if is_compiling():
                return
            me = ref()
            if me is None or name in me._out or not me._armed() or not isinstance(output, Tensor):
                return
            if output.dim() < 2 or not output.is_floating_point() or output.numel() == 0:
                return
            y = output.detach()
            y = y.reshape(-1, y.shape[-2], y.shape[-1]) if y.dim() > 2 else y.unsqueeze(0)  # (B, T, d)
            y = y[:, :ATTENTION_POSITIONS]
            me._out[name] = y[: max(1, ATTENTION_POSITIONS // y.shape[1])]

        return hook

    def take(self) -> AttentionSample | None:
        """The saturation of every pair measured since the last take, or ``None`` (device ops only)."""
        if not self._out:
            return None
        out, self._out = self._out, {}
        fracs = []
        nan = torch.full((), float("nan"), device=self.device)
        with torch.no_grad():
            for q, k in self.pairs:
                a, b = out.get(q), out.get(k)
                if a is None or b is None or a.shape[-1] != b.shape[-1] or b.shape[1] < 2:
                    fracs.append(nan)
                    continue
                n = min(a.shape[0], b.shape[0])
                p = torch.softmax(a[:n].float() @ b[:n].float().transpose(1, 2) / a.shape[-1], -1)
                passing = (1 - p.square().sum(-1)).mean() / (1 - 1 / p.shape[-1])
                fracs.append(passing.to(self.device))
        return AttentionSample(self.pairs, torch.stack(fracs))

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class GradSample:
    """A strided sample of this step's gradients, for layers whose gradient tensors persist across steps.

    Attributes:
        values: float32[k], the sampled entries (zeros for parameters without a gradient).
        layer: long[k], the layer index of each entry (the same every step).
        carried: bool[L], layers whose every gradient tensor is last step's object.
    """

    values: Tensor
    layer: Tensor
    carried: Tensor


class GradCarry:
    """Which layers' gradient tensors are last step's objects, and then a sample of the gradients.

    A loop that zeroes with ``set_to_none=True`` (the default of ``zero_grad`` since torch 2.0) hands
    the optimizer new gradient tensors every step: nothing can be carried over, and :meth:`observe`
    answers ``None`` after one identity check per parameter on the host. Where some layers' tensors
    persist (``set_to_none=False``, or no ``zero_grad`` for that optimizer) it returns a sample
    of the gradients (:data:`CARRY_SAMPLE` entries per tensor, drawn as :class:`_Sampler` draws) for
    :class:`~gradwatch.detectors.accumulating.Accumulating`.

    Args:
        layers: the watched layers.
        device: where the sample goes.
        per_tensor: sampled entries per gradient tensor.
    """

    def __init__(self, layers: Sequence[Layer], device: torch.device, per_tensor: int = CARRY_SAMPLE) -> None:
        self.n = len(layers)
        self._sampler = _Sampler(layers, per_tensor, device)
        #: Every watched parameter in layer order (each layer's ``params``): the order :meth:`observe` takes.
        self.params: list[nn.Parameter] = [p for x in layers for p in x.params]
        position = {id(p): j for j, p in enumerate(self.params)}
        self._order = [position[id(p)] for p in self._sampler.params]  # the sampler's tensors, as positions here
        sampled = {id(p) for p in self._sampler.params}  # empty tensors are not sampled, nor counted as carried
        # The layer of each parameter, -1 for an empty one.
        self._layer = [i if id(p) in sampled else -1 for i, x in enumerate(layers) for p in x.params]
        # Weak references to last step's gradients, in layer order. Python hands back the same reference object for
        # the same live object, and last step's references are alive (held here) while this step's are made, so
        # "the same tensor" is "the same reference". A parameter without a gradient holds a placeholder, ``True``
        # and ``False`` on alternate steps, so that two steps without one never look alike.
        self._refs: list[weakref.ref[Tensor] | bool] | None = None
        self._none = False
        self._kept = _Kept()  # carried gradients keep their storage: their sample views are kept too
        self._masks: dict[tuple[bool, ...], Tensor] = {}

    def observe(self, grads: Sequence[Tensor | None] | None = None) -> GradSample | None:
        """The sample when some layer's gradients are last step's tensors, else ``None``.

        Args:
            grads: the gradient (``.grad``) of every parameter in :attr:`params` order (``None`` where absent),
                when the caller has read them already; ignored for DTensor parameters (gathered as local shards,
                new objects every step), whose ``.grad`` is read here.
        """
        if grads is None or not self._sampler._plain or len(grads) != len(self.params):
            grads = list(map(_GRAD, self.params))
        try:
            refs: list[weakref.ref[Tensor] | bool] = list(map(weakref.ref, grads))  # type: ignore[arg-type]
        except TypeError:  # some parameter has no gradient
            self._none = none = not self._none
            refs = [none if g is None else weakref.ref(g) for g in grads]
        last, self._refs = self._refs, refs
        if last is None or len(last) != len(refs) or not any(map(operator.is_, refs, last)):
            return None  # the usual case: every tensor is new (or the first look)
        carried = [False] * self.n
        fresh = [False] * self.n
        for i, r, was in zip(self._layer, refs, last):
            if i < 0 or isinstance(r, bool):
                continue
            if r is was:
                carried[i] = True
            else:
                fresh[i] = True
        key = tuple(c and not f for c, f in zip(carried, fresh))
        if not any(key):
            return None
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= 16:
                self._masks.clear()
            mask = self._masks[key] = torch.tensor(key, dtype=torch.bool, device=self._sampler.device)
        now = [grads[j] for j in self._order]
        return GradSample(self._sampler.take(now, self._kept), self._sampler.index, mask)


class ReachProbe:
    """Whether autograd reached the parameters of chosen layers during the last backward.

    :meth:`watch` puts a post-accumulate-grad hook on the parameters of the given layers (those whose
    gradient was exactly zero at a logging step: few, and only then); each backward that accumulates a
    gradient into one of them marks its layer reached. :meth:`unreached` is read (host) once per step
    and resets the marks. Layers not watched are never called unreached.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        self._layers = layers
        self._handles: dict[int, list[RemovableHandle]] = {}
        self._reached: set[int] = set()

    @property
    def watched(self) -> tuple[int, ...]:
        """Indices of the probed layers."""
        return tuple(sorted(self._handles))

    @property
    def probing(self) -> bool:
        """Whether some layer is probed."""
        return bool(self._handles)

    def watch(self, indices: Sequence[int]) -> None:
        """Probe the layers at ``indices`` (already probed ones are kept)."""
        for i in indices:
            if i in self._handles:
                continue
            hooks = []
            for p in self._layers[i].params:
                if hasattr(p, "register_post_accumulate_grad_hook"):
                    hooks.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._reached.add(i)))
            self._handles[i] = hooks

    def unwatch(self, indices: Sequence[int]) -> None:
        """Stop probing ``indices``."""
        for i in indices:
            for h in self._handles.pop(i, []):
                h.remove()

    def unreached(self) -> tuple[int, ...]:
        """Probed layers that no backward reached since the last call (then the marks are reset)."""
        out = tuple(i for i in sorted(self._handles) if i not in self._reached)
        self._reached = set()
        return out

    def remove(self) -> None:
        """Remove every hook."""
        self.unwatch(list(self._handles))


@dataclass(frozen=True)
class EvidenceSnapshot:
    """What the remedies know beyond the architecture, on the host, when an alert is worded.

    Attributes:
        optimizer: the optimizer's hyper-parameters, when gradwatch knows the optimizer.
        update_ratio: the last measured ``||dw|| / ||w||`` per layer (NaN-free).
        update_step: the step whose update ``update_ratio`` measured.
        update_grad_ratio: ``||g|| / ||w||`` per layer at that step: an update is the learning rate's
            doing only where the gradient behind it was not itself exploding.
        peak_update: the largest update ratio measured so far on a layer whose gradient was not
            exploding then (``||g|| / ||w|| < 50``), as ``(layer, ratio, step)``: the learning rate's
            largest step, kept when later updates are skipped or the weights already overflowed.
        input_rms: RMS of the input reaching the first weight layer at the last logging step.
        input_max: its max |x|.
        input_layer: the module whose input was measured (``""``: the model itself).
        loss_start: the first loss seen (``None`` without a loss).
        loss_last: the loss at the last step seen.
        loss_best: the lowest loss EMA seen.
        loss_stalled: steps since the loss EMA last improved by 1%.
        loss_jump: the largest loss over its running mean (EMA) at one step since the previous logging step.
        loss_jump_step: the step of that jump.
        batch_size: samples in the batch reaching the first weight layer at the last logging step.
        finding: the named figures of the finding being worded (``Finding.evidence``).
    """

    optimizer: OptimizerInfo | None = None
    update_ratio: dict[str, float] = field(default_factory=dict)
    update_step: int | None = None
    update_grad_ratio: dict[str, float] = field(default_factory=dict)
    peak_update: tuple[str, float, int] | None = None
    input_rms: float | None = None
    input_max: float | None = None
    input_layer: str | None = None
    loss_start: float | None = None
    loss_last: float | None = None
    loss_best: float | None = None
    loss_stalled: int | None = None
    loss_jump: float | None = None
    loss_jump_step: int | None = None
    batch_size: int | None = None
    finding: dict[str, float] = field(default_factory=dict)

    def largest_update(self, among: Sequence[str] | None = None) -> tuple[str, float] | None:
        """The layer with the largest update ratio (among ``among`` when given) and its ratio."""
        items = [(k, v) for k, v in self.update_ratio.items() if among is None or k in among]
        items = [(k, v) for k, v in items if math.isfinite(v)]
        return max(items, key=lambda kv: kv[1]) if items else None


# Loss tracking for the remedies' wording: the first loss (what "started at" means: before any update
# could make it worse), an EMA (alpha 0.9: a ~10-step memory, so one batch neither makes nor hides a
# trend) and its best value.
_LOSS_ALPHA = 0.9
_LOSS_IMPROVED = 0.99  # the EMA improved when it fell below 99% of its best (1%: above batch noise of an EMA)


class LossTrack:
    """Summary of the loss for the remedies: first, last, best EMA, steps since it improved, largest jump.

    Each step's loss is recorded by reference (no device op); the values travel in the logging step's
    one transfer and the recursion runs on the host (:meth:`fold`).
    """

    def __init__(self) -> None:
        from gradwatch.detectors.base import Series  # the detectors package imports this module's types

        self.series = Series()
        self.count = 0
        self.start = self.ema = self.best = self.last = math.nan
        self.since = 0
        self.jump: float | None = None
        self.jump_step: int | None = None

    @property
    def seen(self) -> bool:
        """Whether a loss was recorded since the last read."""
        return len(self.series) > 0

    def add(self, loss: Tensor, step: int) -> None:
        """Record one step's loss (a float32 device scalar; no device op)."""
        self.series.add(loss, step)

    def readout(self) -> dict[str, Tensor]:
        losses = self.series.readout()
        return {} if losses is None else {"loss/values": losses}

    def fold(self, values: Sequence[float]) -> None:
        """Run the recursion over the read-back losses (oldest first); the jump is this window's largest."""
        steps = self.series.steps()
        self.jump, self.jump_step = None, None
        for loss, step in zip(values, steps):
            if not math.isfinite(loss):
                continue
            if self.count == 0:
                self.start = self.ema = self.best = loss
            else:
                if self.ema > 0:
                    jump = loss / self.ema
                    if self.jump is None or jump > self.jump:
                        self.jump, self.jump_step = jump, step
                self.ema = _LOSS_ALPHA * self.ema + (1 - _LOSS_ALPHA) * loss
                if self.ema < _LOSS_IMPROVED * self.best:
                    self.best, self.since = self.ema, 0
                else:
                    self.since += 1
            self.last = loss
            self.count += 1


class Evidence:
    """The monitor's one handle on the evidence beyond gradients.

    Per step (:meth:`begin`, device work only): the update of the last logging step is measured, the
    gradient tensors' identity is checked (carried over or new), the reach probes are read, the loss is
    folded in. At logging steps :meth:`readout` names the tensors for the one transfer, :meth:`absorb`
    turns the read values into metrics and remembers them for :meth:`snapshot`, and :meth:`end` takes the
    weight sample whose change the next step measures.

    Args:
        model: the watched model.
        layers: the watched layers (registration order until :meth:`bind`).
        armed: whether the coming forward precedes a logging step.
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer], armed: Callable[[], bool]) -> None:
        self.model = model
        self._armed = armed
        self.layers: list[Layer] = list(layers)
        first_p = next((p for x in self.layers for p in x.params), None)
        device = first_p.device if first_p is not None else torch.device("cpu")
        # The model's own input (one hook on the root, never moved: a hook added or moved on a module
        # of a compiled model would make torch.compile recompile).
        self.input: InputScale | None = InputScale(model, "", device, armed) if self.layers else None
        # Softmax saturation of hand-written attention (q/k projection pairs), hooked once here, never moved.
        probe = AttentionProbe(model, device, armed)
        self.attention: AttentionProbe | None = probe if probe.pairs else None
        self.device = device
        self.updates: UpdateTracker | None = None
        self.carry: GradCarry | None = None
        self.probe: ReachProbe | None = None
        self.loss: LossTrack | None = None
        self._ratio: tuple[int, Tensor] | None = None  # measured, waiting for the next readout
        self._input: Tensor | None = None
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        # (param_groups, (groups, parameters), bool[L] of the layers it holds, whether it holds only frozen ones)
        self._held: tuple[list[dict[str, Any]], tuple[int, int], Tensor | None, bool] | None = None
        self._measured = False  # whether this step's begin measured an update
        self._unreached_key: tuple[int, ...] = ()
        self._unreached: Tensor | None = None
        # The evidence as of the last logging step (host), made into an EvidenceSnapshot when asked (snapshot()).
        self._last: EvidenceSnapshot | None = EvidenceSnapshot()
        self._info: OptimizerInfo | None = None
        self._update: Sequence[float] | None = None  # the last measured ratios with a finite one, per layer
        self._update_step: int | None = None
        self._update_g2p: _NormPair | None = None  # ||g||, ||w|| per layer at the step of the update measured
        self._g2p: _NormPair | None = None  # ||g||, ||w|| per layer kept for the update this step's optimizer makes
        self._peak_update: tuple[str, float, int] | None = None
        self._input_scale: tuple[float | None, float | None] = (None, None)  # rms, max |x|
        self._batch_size: int | None = None
        self._loss_fields: tuple[Any, ...] = (None, None, None, None)  # start, last, best, stalled
        self._loss_jump: tuple[float | None, int | None] = (None, None)
        self._weight_norm: Sequence[float] | None = None  # the last per-layer weight norms read (host)
        self._keys: tuple[list[str], list[str]] = ([], [])  # layer names, their update-ratio metric keys
        # (param_groups, (groups, parameters), what they hold): kept while the groups stay, as for _held
        self._holdings: tuple[list[dict[str, Any]], tuple[int, int], _Holdings] | None = None
        self._exploded: list[int] = []  # steps of recent exploding findings (host)

    def bind(self, layers: Sequence[Layer], device: torch.device) -> None:
        """The layers in forward order and the statistics' device (at the monitor's first step)."""
        self.layers = list(layers)
        self.device = device
        self.updates = UpdateTracker(self.layers, device)
        self.carry = GradCarry(self.layers, device)
        self.probe = ReachProbe(self.layers)
        self.loss = LossTrack()
        # The input-scale hook stays where it was put at construction (the first weight layer in
        # registration order): moving a hook would make torch.compile recompile a compiled model.

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry for the evidence to resume as it would have gone on: a pending update sample."""
        return {"update": self.updates.state_dict() if self.updates is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (after :meth:`bind`)."""
        if self.updates is not None:
            self.updates.load_state_dict((state or {}).get("update"))

    def begin(
        self,
        host_step: int,
        loss: Tensor | None,
        optimizer: torch.optim.Optimizer | None,
        grads: Sequence[Tensor] | None = None,
    ) -> dict[str, Any]:
        """This step's evidence, as :class:`~gradwatch.detectors.StepEvidence` fields (no host read).

        Args:
            host_step: this step's number.
            loss: this step's loss (float32 device scalar), when the loop gave one.
            optimizer: the optimizer stepping now, when known (else the last one seen).
            grads: the ``.grad`` of every watched parameter in layer order (``None`` where absent), when the
                caller has read them this step (:meth:`GradCarry.observe`): spares reading them again.
        """
        assert self.updates is not None and self.carry is not None and self.probe is not None
        measured = self.updates.measure() if self.updates.pending else None
        self._measured = measured is not None
        if measured is not None:
            self._ratio = measured
        if self.input is not None:
            x = self.input.take()
            if x is not None:
                self._input = x
        carried = self.carry.observe(grads)
        attention = self.attention.take() if self.attention is not None else None
        if loss is not None and self.loss is not None:
            self.loss.add(loss, host_step)
        given = optimizer is not None
        if optimizer is not None:
            self._optimizer = weakref.ref(optimizer)
        elif self._optimizer is not None:
            optimizer = self._optimizer()
        mask, inert = self._held_by(optimizer) if optimizer is not None else (None, False)
        return {
            "optimized": mask,
            "optimizer_inert": inert and given,
            "carried": carried,
            "unreached": self._unreached_mask(self.probe.unreached()) if self.probe.probing else None,
            "update_ratio": measured[1] if measured is not None else None,
            "attention": attention,
        }

    def end(self, step: int, logging: bool) -> None:
        """After the detectors: at a logging step that reads the weights, sample those the coming step changes.

        The monitor passes ``logging`` True at the logging steps that read the weight norms (every
        ``param_norm_every`` steps: every logging step at the default ``log_every=10``), so the update
        ratio is measured on the same period as the weight norms it is compared with.

        The weights are those :meth:`begin` sampled if it measured an update (nothing between the two moves
        them): that sample is kept as it is.
        """
        if logging and self.updates is not None:
            self.updates.snapshot(step, same_weights=self._measured)
        self._measured = False

    def _held_by(self, optimizer: torch.optim.Optimizer) -> tuple[Tensor | None, bool]:
        """bool[L]: the layers ``optimizer`` holds a parameter of, and whether it holds only frozen parameters.

        Made on the host when the optimizer or its param groups change (another optimizer, ``add_param_group``, a
        group's parameters edited): kept against the ``param_groups`` list itself, its length and the number of
        parameters in it.
        """
        groups = optimizer.param_groups
        size = sum(len(g["params"]) for g in groups)
        cached = self._held
        if cached is not None and cached[0] is groups and cached[1] == (len(groups), size):
            return cached[2], cached[3]
        flags = optimized_layers(optimizer, self.layers)
        mask = torch.tensor(flags, dtype=torch.bool, device=self.device) if flags else None
        held = {id(p) for x in self.layers for p in x.params}
        params = [p for g in groups for p in g["params"]]
        inert = bool(params) and not any(id(p) in held for p in params) and all(not p.requires_grad for p in params)
        self._held = (groups, (len(groups), size), mask, inert)
        return mask, inert

    def _unreached_mask(self, unreached: tuple[int, ...]) -> Tensor | None:
        if not unreached:
            return None
        if unreached != self._unreached_key or self._unreached is None:
            mask = torch.zeros(len(self.layers), dtype=torch.bool)
            mask[list(unreached)] = True
            self._unreached = mask.to(self.device)
            self._unreached_key = unreached
        return self._unreached

    # ------------------------------------------------------------------ logging steps
    def readout(self) -> dict[str, Tensor]:
        """Named 1-D float32 tensors for the logging step's one transfer, as they are (no op)."""
        out: dict[str, Tensor] = {}
        if self._ratio is not None:
            out["update/ratio"] = self._ratio[1]
        if self._input is not None:
            out["input"] = self._input
        if self.loss is not None and self.loss.seen:
            out.update(self.loss.readout())
        return out

    def absorb(
        self,
        values: dict[str, list[float]],
        grad_norm: Sequence[float] | None = None,
        present: Sequence[bool] | None = None,
        param_norm: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Take the read-back values: remember them for the remedies, return the metrics they give.

        Args:
            values: what :meth:`readout` named, read back.
            grad_norm: this logging step's per-layer gradient norms (host), to probe exactly-zero layers.
            present: which layers had a gradient this step.
            param_norm: this logging step's per-layer weight norms (host); ``None`` at a logging step that did not
                read the weights (``param_norm_every``). The gradient-to-weight ratio kept for the update this
                step's optimizer makes (:attr:`EvidenceSnapshot.update_grad_ratio`, which tells the remedies whether
                a large update came from an exploding gradient) is then this step's gradient norms over the last
                weight norms read: the gradient, which can grow by orders of magnitude in a step, is always this
                step's; the weights move by the update ratio per step (1e-3 healthy, so ~1% over ten steps), far
                less than the factor 50 the ratio is compared with. Before any weight norms were read it is not
                updated.
        """
        m: dict[str, float] = {}
        if "update/ratio" in values and self._ratio is not None:
            names, keys = self._ratio_keys()
            measured = values["update/ratio"]
            isfinite = math.isfinite
            if all(map(isfinite, measured)):  # the usual case: every layer measured (a C-level loop)
                m = dict(zip(keys, measured))
            else:
                m = {key: r for key, r in zip(keys, measured) if isfinite(r)}
            if m:
                self._update = tuple(measured)
            self._update_step, self._update_g2p = self._ratio[0], self._g2p
            self._peak_update = self._peak(measured, self._update_g2p, self._update_step, self._peak_update)
            self._ratio = None
        if "input" in values:
            self._input_scale = (values["input"][0], values["input"][1])
            self._input = None
        self._batch_size = self.input.batch_size if self.input is not None else None
        if self.loss is not None and "loss/values" in values:
            t = self.loss
            t.fold(values["loss/values"])
            if t.count:
                self._loss_fields = (t.start, t.last, t.best, t.since)
                self._loss_jump = (t.jump, t.jump_step)
            else:
                self._loss_jump = (None, None)
        else:
            self._loss_jump = (None, None)
        probe = self.probe
        if grad_norm is not None and probe is not None and (probe.probing or 0.0 in grad_norm):
            zero = [i for i, g in enumerate(grad_norm) if g == 0.0 and (present is None or present[i])]
            probe.unwatch([i for i in probe.watched if i not in zero])
            probe.watch(zero)
        if param_norm is not None:
            self._weight_norm = tuple(param_norm)
        if grad_norm is not None and self._weight_norm is not None:  # kept for the update this step's one measures
            self._g2p = (tuple(grad_norm), self._weight_norm)
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is not None:
            self._info = self._describe(opt)
        self._last = None  # made when asked
        return m

    def _ratio_keys(self) -> tuple[list[str], list[str]]:
        """The layers' names and their update-ratio metric keys (made once per set of layers)."""
        if len(self._keys[0]) != len(self.layers):
            names = [x.name for x in self.layers]
            self._keys = (names, [schema.metric_key(schema.UPDATE_RATIO, n) for n in names])
        return self._keys

    def _grad_ratio(self, norms: _NormPair | None) -> dict[str, float]:
        """``||g|| / ||w||`` per layer from ``norms`` (``||g||``, ``||w||``), where the weights are not zero and the
        ratio is finite."""
        if norms is None:
            return {}
        grad_norm, weight_norm = norms
        names = self._ratio_keys()[0]
        isfinite = math.isfinite
        if 0.0 not in weight_norm:  # the usual case: C-level loops
            ratios = list(map(operator.truediv, grad_norm, weight_norm))
            if all(map(isfinite, ratios)):
                return dict(zip(names, ratios))
        out: dict[str, float] = {}
        for name, g, w in zip(names, grad_norm, weight_norm):
            if w > 0:
                r = g / w
                if isfinite(r):
                    out[name] = r
        return out

    def _describe(self, optimizer: torch.optim.Optimizer) -> OptimizerInfo:
        """:func:`describe_optimizer` of ``optimizer``, what its groups hold kept while the groups stay (as
        :meth:`_held_by`): the hyper-parameters are read afresh (a scheduler changes them)."""
        groups = optimizer.param_groups
        key = (len(groups), sum(len(g["params"]) for g in groups))
        cached = self._holdings
        if cached is None or cached[0] is not groups or cached[1] != key:
            cached = self._holdings = (groups, key, _holdings(optimizer, self.layers, self.model))
        return _describe(optimizer, cached[2])

    def relate(self, findings: Sequence[Any]) -> list[Any]:
        """A non-finite step within :data:`AFTER_EXPLODING` steps after an ``exploding`` finding ends that explosion:
        its finding then names it (message and ``prior_growth`` evidence), so its remedies rank the explosion's
        causes (init, learning rate, inputs) before the numerics."""
        if not findings:
            return []
        exploding = [f.step for f in findings if f.kind == "exploding"]
        if exploding:
            self._exploded = sorted({*self._exploded, *exploding})[-8:]
        if not self._exploded:
            return list(findings)
        out = []
        for f in findings:
            if f.kind == "nonfinite":
                before = [s for s in self._exploded if f.step - AFTER_EXPLODING <= s <= f.step]
                if before and not any(k == "prior_growth" for k, _ in f.evidence):
                    s = before[0]
                    f = replace(
                        f,
                        message=f"{f.message} It ends the explosion reported at step {s} (`exploding`).",
                        evidence=(*f.evidence, ("prior_growth", float("inf")), ("exploding_step", float(s))),
                    )
            out.append(f)
        return out

    def _peak(
        self, measured: Sequence[float], norms: _NormPair | None, step: int | None, peak: tuple[str, float, int] | None
    ) -> tuple[str, float, int] | None:
        """The largest update so far (``measured``: the ratios per layer of the update at ``step``) on a layer whose
        gradient was not exploding then (``norms``: ``||g||``, ``||w||`` per layer at that step), or under an
        Adam-family optimizer, whose update is ~lr per entry whatever the gradient."""
        if step is None:
            return peak
        finite = [r for r in measured if math.isfinite(r)]
        if not finite or (peak is not None and max(finite) <= peak[1]):  # the usual case: nothing beyond the peak
            return peak
        g2p = self._grad_ratio(norms)
        opt = self._optimizer() if self._optimizer is not None else None
        adam = opt is not None and any("betas" in g for g in opt.param_groups)
        for layer, r in zip(self._ratio_keys()[0], measured):
            if not math.isfinite(r) or not (adam or g2p.get(layer, math.inf) < _GRAD_EXPLODING):
                continue
            if peak is None or r > peak[1]:
                peak = (layer, r, step)
        return peak

    def snapshot(self, finding_evidence: Sequence[tuple[str, float]] = ()) -> EvidenceSnapshot:
        """The evidence as of the last logging step, with a finding's own figures."""
        last = self._last
        if last is None:
            isfinite = math.isfinite
            names = self._ratio_keys()[0]
            start, loss_last, best, stalled = self._loss_fields
            rms, top = self._input_scale
            last = self._last = EvidenceSnapshot(
                optimizer=self._info,
                update_ratio={n: r for n, r in zip(names, self._update) if isfinite(r)} if self._update else {},
                update_step=self._update_step,
                update_grad_ratio=self._grad_ratio(self._update_g2p),
                peak_update=self._peak_update,
                input_rms=rms,
                input_max=top,
                input_layer=self.input.name if self.input is not None else None,
                loss_start=start,
                loss_last=loss_last,
                loss_best=best,
                loss_stalled=stalled,
                loss_jump=self._loss_jump[0],
                loss_jump_step=self._loss_jump[1],
                batch_size=self._batch_size,
            )
        if not finding_evidence:
            return last
        return EvidenceSnapshot(**{**last.__dict__, "finding": dict(finding_evidence)})

    def remove(self) -> None:
        """Remove every hook (input scale, reach probes)."""
        if self.input is not None:
            self.input.remove()
        if self.attention is not None:
            self.attention.remove()
        if self.probe is not None:
            self.probe.remove()
