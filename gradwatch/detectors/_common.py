"""Helpers shared by the built-in detectors (not part of the framework's public surface)."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradwatch._checks import check_int
from gradwatch._format import fmt  # the one number formatter, re-exported for the detector modules
from gradwatch.detectors.base import (
    Detector,
    DetectorContext,
    Fired,
    Persistence,
    Series,
    StepEvidence,
    Window,
    constant,
    stacked,
    window_steps,
)
from gradwatch.readout import Readout

__all__ = [
    "GradWindow",
    "HostChecked",
    "HostPersistence",
    "HostRow",
    "HostRows",
    "UpdateLossSeries",
    "WindowedChecks",
    "fmt",
    "grad_window",
    "host_list",
    "side_by_side",
]


class GradWindow(NamedTuple):
    """The gradient evidence of a window of steps, stacked once for every detector that folds it.

    Attributes:
        grad_sq: float32[T, L], squared gradient norms.
        present: bool[T or 1, L], layers with a gradient.
        total: float32[T], total gradient norms.
        norm: float32[T, L], gradient norms (``grad_sq.sqrt()``).
        usable: bool[T, L], present with a finite, non-zero gradient (``0 < grad_sq < inf``).
        all_present: every layer has a gradient on every step (known on the host): ``present`` masks nothing.
    """

    grad_sq: Tensor
    present: Tensor
    total: Tensor
    norm: Tensor
    usable: Tensor
    all_present: bool = False

    def only_present(self, t: Tensor) -> Tensor:
        """``t & present`` (``t * present`` for floats), or ``t`` itself (no op) when every layer is present."""
        if self.all_present:
            return t
        return t & self.present if t.dtype == torch.bool else t * self.present


def grad_window(rows: list[StepEvidence]) -> GradWindow:
    """The rows' :class:`GradWindow`, computed once per window for every detector that asks."""

    def make() -> GradWindow:
        grad_sq = stacked(rows, "grad_sq", lambda ev: ev.stats.grad_sq)
        present = stacked(rows, "present", lambda ev: ev.stats.present)
        total = stacked(rows, "total_norm", lambda ev: ev.stats.total_norm)
        every = all(all(ev.stats.present_host) for ev in rows)
        usable = (grad_sq > 0) & (grad_sq < math.inf)  # NaN fails both comparisons
        if not every:
            usable = usable & present
        return GradWindow(grad_sq, present, total, grad_sq.sqrt(), usable, every)

    return rows[-1].derived(("window", "grads", id(rows[0]), len(rows)), make)


def side_by_side(parts: list[Tensor]) -> Tensor:
    """The sources' ``[T]`` or ``[T, 1]`` (model-wide) and ``[T, width]`` (per layer) tensors as one ``[T, n]``."""
    cols = [p.unsqueeze(-1) if p.dim() == 1 else p for p in parts]
    return cols[0] if len(cols) == 1 else torch.cat(cols, -1)


class WindowedChecks(Detector):
    """Several conditions, each per layer or model-wide, all with the same persistence, folded per window.

    ``update`` only records the step (no device op); :meth:`fold` evaluates every condition on
    every recorded step at once and advances one stacked :class:`Persistence` (entries of all
    checks side by side, ``sources`` order). Subclasses list ``sources`` as ``(name, per_layer)``,
    implement :meth:`conditions` and read :meth:`fired_by_source` in ``collect``.
    """

    sources: tuple[tuple[str, bool], ...] = ()

    def __init__(self, persist: int) -> None:
        super().__init__()
        self.persist = check_int("persist", persist, 1)
        self.slices: dict[str, slice] = {}
        self.window = Window()
        self._param_norm: Tensor | None = None  # the last weight norms known (logging steps bring them)

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        n = len(ctx.layers)
        start = 0
        for name, per_layer in self.sources:
            width = n if per_layer else 1
            self.slices[name] = slice(start, start + width)
            start += width
        self.checks = Persistence(self.state, "checks", start, self.persist)
        for value in (math.nan, 0.0, -1.0):  # the constants the folds use, made now rather than at a step
            constant(value, ctx.device)
        self.window = Window()
        self._param_norm = None
        self._unknown = torch.full((n,), float("nan"), device=ctx.device)  # weight norms before any are known

    def update(self, ev: StepEvidence) -> None:
        if self.window.add(ev):
            self.fold()

    def fold(self) -> None:
        """Evaluate the recorded steps and advance the persistence (device only)."""
        rows = self.window.take()
        if not rows:
            return
        pns = []
        for ev in rows:
            if ev.stats.param_norm is not None:
                self._param_norm = ev.stats.param_norm
            pns.append(self._param_norm if self._param_norm is not None else self._unknown)
        by_row = dict(zip(map(id, rows), pns))
        ctx = self.ctx
        assert ctx is not None
        param_norm = stacked(rows, "param_norm", lambda ev: by_row[id(ev)])
        conds, values = self.conditions(rows, param_norm)
        value = side_by_side(values)
        imm = self.immediates(len(rows))
        self.checks.update_window(
            side_by_side(conds),
            value if value.dtype == torch.float32 else value.to(torch.float32),
            window_steps(rows, ctx.device),
            immediate=None if imm is None else side_by_side(imm),
        )

    def immediates(self, steps: int) -> list[Tensor] | None:
        """Per source, bool ``[T, width]``: entries so far past their threshold that they fire on the step
        they are seen (severity-scaled persistence), for the window :meth:`conditions` just evaluated;
        ``None``: every condition needs its streak."""
        return None

    @abstractmethod
    def conditions(self, rows: list[StepEvidence], param_norm: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per source (``sources`` order): bool conditions and float values, ``[T, width]`` for a per-layer
        source and ``[T]`` for a model-wide one (a value need only be right where its entry can fire)."""

    def readout(self) -> dict[str, Tensor]:
        self.fold()
        return super().readout()

    def state_dict(self) -> dict[str, Any]:
        self.fold()
        return super().state_dict()

    def fired_by_source(self, values: dict[str, list[float]]) -> dict[str, list[Fired]]:
        """The fired entries of each check, indexed within the check (and free the latch)."""
        out: dict[str, list[Fired]] = {name: [] for name in self.slices}
        for f in self.checks.fired(values):
            for name, sl in self.slices.items():
                if sl.start <= f.index < sl.stop:
                    out[name].append(f._replace(index=f.index - sl.start))
        return out


class UpdateLossSeries(Detector):
    """Weighs each logging step's largest update-to-weight ratio against the loss, on the host.

    Every step's loss and every measured update (:class:`~gradwatch.evidence.UpdateTracker`, once per
    logging step: the per-layer ratios) are recorded by reference: no device op on the step. At a logging
    step both are read back (one measurement's ratios go to the transfer as they are), each measurement is
    reduced to its largest per-layer ratio on the host (:meth:`largest`), losses and measurements are
    merged by step and handed to the subclass's host recursion :meth:`fold`, whose running statistics (the
    attributes named in ``state_keys``) are checkpointed as float64 tensors.
    """

    state_keys: tuple[str, ...] = ()
    chunk = 64  # measurements after which the kept ratios are concatenated (bounds the tensors kept alive)

    def __init__(self) -> None:
        super().__init__()
        self.losses = Series()
        self._ratios: list[Tensor] = []  # measured per-layer ratios since the last read, by reference
        self._chunks: list[Tensor] = []  # earlier ones, concatenated
        self._steps: list[int] = []  # the steps they measured, not handed over yet
        self._read: list[int] = []  # the steps of what readout handed over

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self.losses = Series()
        self._ratios, self._chunks, self._steps, self._read = [], [], [], []

    @abstractmethod
    def largest(self, ratios: list[float]) -> float:
        """The measurement of one update from its per-layer ratios (float32 values; NaN where none was measured)."""

    def update(self, ev: StepEvidence) -> None:
        if ev.loss is not None:
            self.losses.add(ev.loss, ev.stats.step)
        if ev.update_ratio is not None:  # once per logging step: the step after it
            self._ratios.append(ev.update_ratio)
            self._steps.append(ev.stats.step - 1)
            if len(self._ratios) >= self.chunk:
                self._chunks.append(torch.cat(self._ratios))
                self._ratios = []

    def _updates(self) -> Tensor | None:
        """The measured ratios since the last read, flat (one measurement: its tensor, no op)."""
        parts = [*self._chunks, *self._ratios]
        self._ratios, self._chunks = [], []
        self._read += self._steps
        self._steps = []
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def readout(self) -> dict[str, Tensor]:
        out = {}
        losses, updates = self.losses.readout(), self._updates()
        if losses is not None:
            out["losses"] = losses
        if updates is not None:
            out["updates"] = updates
        return out

    def fold(
        self, losses: list[float], loss_steps: list[int], updates: list[float], update_steps: list[int]
    ) -> list[tuple[int, float]]:
        """Merge losses and measurements by step and run :meth:`fold_events`; the ``(step, value)`` that fire."""
        events = sorted(
            [(s, 0, v) for s, v in zip(loss_steps, losses)] + [(s, 1, v) for s, v in zip(update_steps, updates)]
        )
        return self.fold_events(events)

    @abstractmethod
    def fold_events(self, events: list[tuple[int, int, float]]) -> list[tuple[int, float]]:
        """Host recursion over ``(step, is_update, value)`` events in step order; the ``(step, value)`` that fire."""

    def fired(self, losses: list[float], ratios: list[float]) -> list[tuple[int, float]]:
        """:meth:`fold` the read-back losses and measurements (``ratios``: every measurement's per-layer ratios
        in turn, as :meth:`readout` handed them over) with the steps they were recorded at."""
        steps, self._read = self._read, []
        k = len(steps)
        if k == 1:
            updates = [self.largest(ratios)]
        else:
            width = len(ratios) // k if k else 0
            updates = [self.largest(ratios[i * width : (i + 1) * width]) for i in range(k)]
        return self.fold(losses, self.losses.steps(), updates, steps)

    def state_dict(self) -> dict[str, Any]:
        """The host statistics as float64 tensors (values not read yet are folded first: one host read)."""
        updates = self._updates()
        self.fired(self.losses.take(), updates.tolist() if updates is not None else [])
        return {k: torch.tensor(getattr(self, k), dtype=torch.float64) for k in self.state_keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.state_keys:
            if k in state:
                setattr(self, k, float(state[k]))


Getter = Callable[[StepEvidence], "Tensor | None"]


class HostRow(NamedTuple):
    """One recorded step on the host: its number, which layers had a gradient, its columns' values, and a
    dict for what the detectors that read the same step derive from it alike (:meth:`StepEvidence.derived`)."""

    step: int
    present: tuple[bool, ...]
    cols: dict[str, list[float]]
    memo: dict[Any, Any]


class _Block(NamedTuple):
    steps: list[int]
    present: list[tuple[bool, ...]]
    memo: list[dict[Any, Any]]
    cols: dict[str, tuple[list[int], Tensor, int]]  # name -> (rows that have it, tensor, values per row)


_HOST = ("host",)  # the key of a step's host memo in its evidence's cache


def _memo(ev: StepEvidence) -> dict[Any, Any]:
    return ev.derived(_HOST, dict)  # type: ignore[no-any-return]


def host_list(v: Any) -> list[float]:
    """A read-back value as a flat list (the monitor's transfer gives one; a test's ``tolist()`` may nest)."""
    if not isinstance(v, list):
        return [v]
    if v and isinstance(v[0], list):
        return [x for row in v for x in row]
    return v


class _Shared:
    """A tensor in the transfer for every detector that reads the same step, and its values once read."""

    __slots__ = ("tensor", "values")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.values: Any = None


class HostRows:
    """Per-step device tensors kept by reference and brought to the host in the logging step's one transfer.

    A check that compares a few figures per layer and step is cheaper on the host than on the device:
    on the device each comparison, mask and streak update is a kernel launch (microseconds of dispatch
    on a CPU), whatever the width; on the host the values are in the transfer the logging step makes
    anyway, and a check that holds nowhere costs one C-level scan of a list. ``columns`` names what each
    step contributes (a getter per name: a device tensor of fixed size, or ``None`` when the step has
    none); ``extra`` adds ``[T, width]`` columns computed per block of rows on the device.

    Recording a step costs no device op. :meth:`readout` hands the columns over: a step's own tensor when
    the window is one step (no op), one ``stack`` per column otherwise (shared with every detector that
    stacks the same rows). A window that reaches ``capacity`` steps is stacked into a block then (bounding
    the tensors kept alive); its blocks are concatenated at the read. :meth:`rows` gives the host rows of
    what :meth:`readout` handed over, and :meth:`take_pending` reads what was not handed over (checkpoints).
    """

    def __init__(
        self,
        columns: dict[str, Getter],
        extra: Callable[[list[StepEvidence]], dict[str, Tensor]] | None = None,
        capacity: int = 64,
    ) -> None:
        self.columns, self.extra, self.capacity = columns, extra, capacity
        self._getters = tuple(columns.items())
        self._rows: list[StepEvidence] = []
        self._blocks: list[_Block] = []
        self._read: list[_Block] = []  # handed over by readout, not turned into rows yet
        self._links: dict[str, tuple[_Shared, bool]] = {}  # name -> its transfer, and whether this one made it

    def add(self, ev: StepEvidence) -> None:
        """Record ``ev`` (by reference; a full window is stacked into a block, still on the device)."""
        self._rows.append(ev)
        if len(self._rows) >= self.capacity:
            self._blocks.append(self._block(self._rows))
            self._rows = []

    def _block(self, rows: list[StepEvidence]) -> _Block:
        cols: dict[str, tuple[list[int], Tensor, int]] = {}
        if len(rows) == 1:  # one step (log_every=1): its own tensors, no op
            ev = rows[0]
            for name, get in self.columns.items():
                t = get(ev)
                if t is not None:
                    cols[name] = ([0], t, t.numel())
            if self.extra is not None:
                for name, t in self.extra(rows).items():
                    cols[name] = ([0], t, t.numel())
            return _Block([ev.stats.step], [ev.stats.present_host], [_memo(ev)], cols)
        for name, get in self.columns.items():
            items = [get(ev) for ev in rows]
            have = [i for i, x in enumerate(items) if x is not None]
            if not have:
                continue
            first = items[have[0]]
            assert first is not None
            if len(have) == 1:
                t = first
            elif len(have) == len(rows):
                t = stacked(rows, name, get)  # type: ignore[arg-type]
            else:
                t = torch.stack([items[i] for i in have])  # type: ignore[misc]
            cols[name] = (have, t, first.numel())
        if self.extra is not None:
            for name, t in self.extra(rows).items():
                cols[name] = (list(range(len(rows))), t, t.shape[-1] if t.dim() else 1)
        return _Block(
            [ev.stats.step for ev in rows], [ev.stats.present_host for ev in rows], [_memo(ev) for ev in rows], cols
        )

    def _pending(self) -> list[_Block]:
        blocks = self._blocks + ([self._block(self._rows)] if self._rows else [])
        self._blocks, self._rows = [], []
        return blocks

    @staticmethod
    def _tensors(blocks: list[_Block]) -> dict[str, Tensor]:
        if len(blocks) == 1:
            return {n: c[1] for n, c in blocks[0].cols.items()}
        names = list(dict.fromkeys(n for b in blocks for n in b.cols))
        out = {}
        for n in names:
            parts = [b.cols[n][1] for b in blocks if n in b.cols]
            out[n] = parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])
        return out

    def readout(self) -> dict[str, Tensor]:
        """The columns recorded since the last read, by name (none: ``{}``).

        A tensor that another detector reading the same step handed over already (the same object: a step's
        gradient norms, or the same stack of them) is not handed over twice: :meth:`rows` takes its values
        from that detector's read (its ``collect`` runs first, as its ``readout`` did).
        """
        rows = self._rows
        if len(rows) == 1 and not self._blocks and not self._read:
            return self._readout_one(rows[0])
        blocks = self._pending()
        self._read += blocks
        tensors = self._tensors(blocks)
        if not blocks:
            return tensors
        shared = blocks[-1].memo[-1].setdefault("transfer", {})  # the read step's: every detector's
        out = {}
        for n, t in tensors.items():
            link = shared.get(id(t))
            if link is not None and link.tensor is t:
                self._links[n] = (link, False)
            else:
                link = shared[id(t)] = _Shared(t)
                self._links[n] = (link, True)
                out[n] = t
        return out

    def _readout_one(self, ev: StepEvidence) -> dict[str, Tensor]:
        """:meth:`readout` of a window of one step (log_every=1): its own tensors, the shared ones once."""
        self._rows = []
        cache = ev.cache
        memo = cache.get(_HOST)
        if memo is None:
            memo = cache[_HOST] = {}
        shared = memo.get("transfer")
        if shared is None:
            shared = memo["transfer"] = {}
        cols: dict[str, tuple[list[int], Tensor, int]] = {}
        out: dict[str, Tensor] = {}
        links = self._links
        items = [(name, get(ev)) for name, get in self._getters]
        if self.extra is not None:
            items += self.extra([ev]).items()
        for name, t in items:
            if t is None:
                continue
            cols[name] = ([0], t, 1)  # (one row: the width is not used)
            link = shared.get(id(t))
            if link is not None and link.tensor is t:
                links[name] = (link, False)
            else:
                link = shared[id(t)] = _Shared(t)
                links[name] = (link, True)
                out[name] = t
        self._read = [_Block([ev.stats.step], [ev.stats.present_host], [memo], cols)]
        return out

    def rows(self, values: dict[str, list[float]]) -> list[HostRow]:
        """The host rows of what :meth:`readout` handed over since the last call, oldest first."""
        blocks, self._read = self._read, []
        links, self._links = self._links, {}
        if len(blocks) == 1 and len(blocks[0].steps) == 1:  # one step (log_every=1): its row, in one pass
            b = blocks[0]
            cols = {}
            for n in b.cols:
                have = links.get(n)
                if have is None:
                    v = values[n]
                elif have[1]:
                    v = have[0].values = values[n]
                elif have[0].values is not None:
                    v = have[0].values
                else:  # the detector that handed it over did not collect: read it now (one host read)
                    v = have[0].tensor.reshape(-1).tolist()
                cols[n] = host_list(v)
            return [HostRow(b.steps[0], b.present[0], cols, b.memo[0])]
        if links:
            values = dict(values)
            for n, (link, own) in links.items():
                if own:
                    link.values = values[n]
                elif link.values is not None:
                    values[n] = link.values
                else:  # the detector that handed it over did not collect: read it now (one host read)
                    values[n] = link.tensor.reshape(-1).tolist()
        return self._split(blocks, values)

    def take_pending(self) -> list[HostRow]:
        """The rows not handed over yet, on the host (one read: checkpoints only)."""
        blocks = self._pending()
        if not blocks:
            return []
        out = Readout()
        out.add_all("", self._tensors(blocks))
        return self._split(blocks, dict(out.read()))

    @staticmethod
    def _split(blocks: list[_Block], values: dict[str, Any]) -> list[HostRow]:
        if len(blocks) == 1 and len(blocks[0].steps) == 1:  # one step: every value is its own
            b = blocks[0]
            return [HostRow(b.steps[0], b.present[0], {n: host_list(values[n]) for n in b.cols}, b.memo[0])]
        out: list[HostRow] = []
        pos = {n: 0 for n in values}
        for b in blocks:
            cols: list[dict[str, list[float]]] = [{} for _ in b.steps]
            for n, (have, t, w) in b.cols.items():
                flat = host_list(values[n])
                at = pos[n]
                size = t.numel()
                part = flat[at : at + size]
                pos[n] = at + size
                if size == w and len(have) > 1:  # one tensor for every row (the same object): broadcast
                    for i in have:
                        cols[i][n] = part
                else:
                    for k, i in enumerate(have):
                        cols[i][n] = part[k * w : (k + 1) * w]
            out += [HostRow(s, p, c, m) for s, p, c, m in zip(b.steps, b.present, cols, b.memo)]
        return out

    def reset(self) -> None:
        """Forget every recorded step."""
        self._rows, self._blocks, self._read, self._links = [], [], [], {}


class HostChecked(Detector):
    """A detector whose checks run on the host, over the :class:`HostRows` read back at the logging step.

    Steps are recorded by reference (:meth:`update`, no device op) and their raw figures handed to the one
    transfer (:meth:`readout`). The state lives on the host, sized by the number of layers: a state loaded
    before :meth:`bind` is kept as given and applied when :meth:`_bound` is called at the end of ``bind``.
    Subclasses set up their columns in ``bind``, check rows in :meth:`_run` and restore in :meth:`_load`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._rows: HostRows | None = None
        self._loaded: dict[str, Any] | None = None  # a state loaded before bind, as given

    def _bound(self, ctx: DetectorContext, rows: HostRows) -> None:
        """End of ``bind``: the rows to record into, the device state, a state loaded before."""
        self._rows = rows
        self.state.bind(ctx.device)
        if self._loaded is not None:
            self._load(self._loaded)
            self._loaded = None

    def update(self, ev: StepEvidence) -> None:
        self._rows.add(ev)  # type: ignore[union-attr]  # (bound before any step)

    def readout(self) -> dict[str, Tensor]:
        assert self._rows is not None
        return self._rows.readout()

    def _fold_pending(self) -> None:
        """Check the steps not read back yet (one host read: checkpoints only)."""
        assert self._rows is not None
        pending = self._rows.take_pending()
        if pending:
            self._run(pending)

    def _unbound_state(self) -> dict[str, Any]:
        """:meth:`state_dict` before ``bind``: what was loaded, as given."""
        return {} if self._loaded is None else dict(self._loaded)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.state.bound:
            self._load(state)
        else:  # the number of layers is known at bind
            self._loaded = {**(self._loaded or {}), **state}

    @abstractmethod
    def _run(self, rows: list[HostRow]) -> None:
        """Check the rows read back, oldest first."""

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None:
        """Restore a state (the detector is bound)."""


class HostPersistence:
    """:class:`~gradwatch.detectors.base.Persistence` on the host, for ``n`` entries checked on read-back values.

    The same semantics: an entry's streak counts the consecutive steps its condition held; where it
    reaches ``persist`` (or the step's ``immediate`` set holds it) and the entry is free, the step and
    value are latched until :meth:`fired` reads them. An entry's last latched value stays after the read
    (as the device latch keeps it). Work per step is the entries whose condition holds or held the step
    before: none in a healthy run.
    """

    def __init__(self, n: int, persist: int) -> None:
        self.n, self.persist = n, persist
        self.reset()

    def reset(self) -> None:
        """Fresh state."""
        self.streak = [0.0] * self.n
        self.fired_step = [-1.0] * self.n
        self.fired_value = [0.0] * self.n
        self.active: set[int] = set()  # entries with a non-zero streak
        self.latched: set[int] = set()  # entries latched and not read yet

    def advance(self, held: list[int], values: list[float], step: int, immediate: list[int] = ()) -> None:  # type: ignore[assignment]
        """One step: ``held`` the entries whose condition holds, ``values`` indexed by entry."""
        if not held and not immediate and not self.active:  # nothing holds now nor did the step before
            return
        streak, fired_step = self.streak, self.fired_step
        now = set(held)
        for i in self.active - now:
            streak[i] = 0.0
        for i in held:
            streak[i] += 1.0
            if streak[i] >= self.persist and fired_step[i] < 0:
                fired_step[i], self.fired_value[i] = float(step), values[i]
                self.latched.add(i)
        for i in immediate:
            if fired_step[i] < 0:
                fired_step[i], self.fired_value[i] = float(step), values[i]
                self.latched.add(i)
        self.active = now

    def fired(self) -> list[Fired]:
        """The latched entries (by index), and free them."""
        out = []
        for i in sorted(self.latched):
            s, v = self.fired_step[i], self.fired_value[i]
            out.append(Fired(i, int(s), v, {"value": v}))
            self.fired_step[i] = -1.0
        self.latched = set()
        return out

    def load(self, streak: list[float], fired_step: list[float], fired_value: list[float]) -> None:
        """Restore the checkpointed entries."""
        self.streak, self.fired_step, self.fired_value = list(streak), list(fired_step), list(fired_value)
        self.active = {i for i, s in enumerate(self.streak) if s != 0}
        self.latched = {i for i, s in enumerate(self.fired_step) if s >= 0}
