"""The detector framework: what a detector sees, how it keeps state, and what it reports.

One step's trip through a detector:

1. :meth:`Detector.bind` (once, at the first step): declare device state in :attr:`Detector.state`
   (a :class:`DeviceState`), usually through :class:`Latch` and :class:`Persistence`.
2. :meth:`Detector.update` (every step): fold the step's :class:`StepEvidence` into that state with
   tensor arithmetic only: no ``.item()``, no ``if tensor`` (the device never waits for the host).
3. :meth:`Detector.readout` (logging steps): named 1-D float tensors. The monitor reads every
   detector's readout in one transfer and hands each detector its own values back, by name.
4. :meth:`Detector.collect` (right after): host values in, :class:`Finding` objects out.

``state_dict``/``load_state_dict``/``reset`` come from the declared state: a new detector writes
only its ``bind``, ``update`` and ``collect``.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from gradwatch.activations import ActivationStats
from gradwatch.layers import Layer
from gradwatch.stats import GradStats

if TYPE_CHECKING:
    from gradwatch.evidence import AttentionSample, GradSample
    from gradwatch.temporal import TimeProfile

__all__ = [
    "ActivationStats",
    "Detector",
    "DetectorContext",
    "DeviceState",
    "Finding",
    "Fired",
    "GradStats",
    "Latch",
    "Persistence",
    "Series",
    "StepEvidence",
    "Window",
    "constant",
    "stacked",
    "window_steps",
]

TINY = 1e-30  # floor before a log or a division: far below any gradient statistic that means something


@dataclass(frozen=True)
class Finding:
    """What a detector found, before remedies are attached.

    Attributes:
        kind: alert kind (``"vanishing"``, ``"exploding"``, ...; see :mod:`gradwatch.schema`).
        source: which check inside the detector fired (de-duplication key with ``kind``).
        step: step at which the condition was established.
        layer: layer name or ``None`` for model-wide.
        value: the figure that crossed ``threshold``.
        threshold: the threshold.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: one sentence, with the layer and the figure.
        layers: every layer concerned, most relevant first.
        evidence: further named figures behind the finding, e.g. ``(("typical_norm", 0.8),)``.
    """

    kind: str
    source: str
    step: int
    layer: str | None
    value: float
    threshold: float
    severity: str
    message: str
    layers: tuple[str, ...] = ()
    evidence: tuple[tuple[str, float], ...] = ()


@dataclass
class DetectorContext:
    """What a detector may know about the model: the layers, never the modules."""

    layers: list[Layer]
    device: torch.device
    numel: Tensor  # float32[L]: elements per layer
    weight_layers: list[int] = field(default_factory=list)  # indices of weight layers, forward order
    activation_names: list[str] = field(default_factory=list)
    activation_kinds: list[str] = field(default_factory=list)  # "relu" | "sigmoid" | "tanh" | "other"
    excluded_activations: list[bool] = field(default_factory=list)  # True for output activations
    time_layers: list[str] = field(default_factory=list)  # recurrent modules profiled in time (track_time)

    @property
    def names(self) -> list[str]:
        """Layer names, in forward order."""
        return [layer.name for layer in self.layers]


@dataclass
class StepEvidence:
    """Everything one step hands every detector, by name.

    Attributes:
        stats: the step's per-layer gradient statistics.
        step: this step's number as a float32 device scalar.
        activations: activation fractions (``track_activations=True``), else ``None``.
        times: the temporal profile of recurrent modules (``track_time=True``, logging steps), else ``None``.
        loss: the step's training loss as a float32 device scalar, when the loop gave one.
        logging: whether this is a logging step (a host bool).
        optimized: bool[L], layers with a parameter in the optimizer stepping now (``None``: unknown).
        optimizer_inert: that optimizer holds only parameters with ``requires_grad=False`` (a host bool).
        carried: a sample of the gradients of layers whose gradient tensors are last step's objects
            (:class:`~gradwatch.evidence.GradSample`); ``None`` when every gradient is a new tensor.
        unreached: bool[L], probed layers (exactly zero at a logging step) that no backward reached.
        update_ratio: float32[L], ``||dw|| / ||w||`` of the last logging step's update, on the step it
            is measured (the next one), else ``None``.
        attention: softmax saturation of hand-written attention's q/k pairs
            (:class:`~gradwatch.evidence.AttentionSample`), on logging steps, else ``None``.
        cache: values derived from the evidence this step, shared by detectors (see :meth:`derived`).
    """

    stats: GradStats
    step: Tensor
    activations: ActivationStats | None = None
    times: TimeProfile | None = None
    loss: Tensor | None = None
    logging: bool = False
    optimized: Tensor | None = None
    optimizer_inert: bool = False
    carried: GradSample | None = None
    unreached: Tensor | None = None
    update_ratio: Tensor | None = None
    attention: AttentionSample | None = None
    cache: dict[Any, Any] = field(default_factory=dict)

    def derived(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` computed once per step under ``key``, shared by every detector that asks.

        Every tensor op costs microseconds of dispatch on the per-step path; what two detectors
        derive from the same evidence (Vanishing and Exploding both need the depth profile) is
        computed once. ``key`` must name everything the value depends on beyond this evidence.
        """
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@functools.cache
def constant(value: float, device: torch.device) -> Tensor:
    """A 0-d float32 ``value`` on ``device``, made once: ``torch.where(c, x, constant(...))`` then dispatches
    no op to wrap a Python number in a tensor. Ask for it first at bind, so that no step makes it."""
    return torch.full((), value, dtype=torch.float32, device=device)


def _flat32(t: Tensor) -> Tensor:
    """``t`` as 1-D float32; ``t`` itself (no op) when it already is."""
    return t if t.dim() == 1 and t.dtype == torch.float32 else t.reshape(-1).to(torch.float32)


def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        *path, leaf = k.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


class _Decl(NamedTuple):
    factory: Callable[[torch.device], Tensor]
    persistent: bool
    readout: bool


class DeviceState:
    """Declared device tensors, in the spirit of torchmetrics' ``Metric.add_state``.

    Declare each tensor once with :meth:`add_state` (a factory that builds its fresh value on a
    device); :meth:`bind` allocates them all, and the helper then moves, checkpoints and resets
    them. Tensors are read and replaced as attributes or items::

        st = DeviceState()
        st.add_state("mean", lambda dev: torch.zeros((), device=dev))
        st.bind(torch.device("cpu"))
        st.mean = 0.9 * st.mean + 0.1 * x       # or st["mean"]

    A dotted name (``"depth.streak"``) is checkpointed nested (``{"depth": {"streak": ...}}``).
    A state loaded before :meth:`bind` is kept and applied when the tensors are allocated.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_decls", {})
        object.__setattr__(self, "_tensors", None)
        object.__setattr__(self, "_loaded", None)
        object.__setattr__(self, "device", None)
        object.__setattr__(self, "_read", {})
        object.__setattr__(self, "_latches", [])  # the latches declared here (their entries may skip the read)
        object.__setattr__(self, "_readout_names", ())  # readout=True names outside every latch (fixed at bind)

    # -- declaration
    def add_state(
        self,
        name: str,
        factory: Callable[[torch.device], Tensor],
        *,
        persistent: bool = True,
        readout: bool = False,
    ) -> None:
        """Declare a tensor.

        Args:
            name: its name (dots nest it in :meth:`state_dict`).
            factory: builds the fresh tensor on a given device.
            persistent: whether it goes into :meth:`state_dict`.
            readout: whether :meth:`readout` returns it (read back at logging steps).

        Raises:
            ValueError: the name is taken, or the tensors are already allocated.
        """
        if name in self._decls:
            raise ValueError(f"state {name!r} is declared twice")
        if self._tensors is not None:
            raise ValueError(f"state {name!r} declared after bind(); declare every state before binding")
        self._decls[name] = _Decl(factory, persistent, readout)

    @property
    def names(self) -> list[str]:
        """Declared names, in declaration order."""
        return list(self._decls)

    @property
    def bound(self) -> bool:
        """Whether the tensors are allocated."""
        return self._tensors is not None

    # -- lifecycle
    def bind(self, device: torch.device | str) -> None:
        """Allocate every declared tensor on ``device`` (then apply a state loaded before)."""
        object.__setattr__(self, "device", torch.device(device))
        object.__setattr__(self, "_tensors", {n: d.factory(self.device) for n, d in self._decls.items()})
        latched = {n for latch in self._latches for n in latch.names}
        object.__setattr__(
            self, "_readout_names", tuple(n for n, d in self._decls.items() if d.readout and n not in latched)
        )
        loaded = self._loaded
        object.__setattr__(self, "_loaded", None)
        if loaded is not None:
            self._apply(loaded)

    def to(self, device: torch.device | str) -> None:
        """Move every tensor to ``device``."""
        device = torch.device(device)
        if self._tensors is not None:
            object.__setattr__(self, "_tensors", {n: t.to(device) for n, t in self._tensors.items()})
        object.__setattr__(self, "device", device)

    def reset(self, *names: str) -> None:
        """Fresh values for ``names`` (every tensor when none is given)."""
        if self._tensors is None:
            object.__setattr__(self, "_loaded", None)
            return
        for n in names or tuple(self._decls):
            self._tensors[n] = self._decls[n].factory(self.device)

    def add_latch(self, latch: Latch) -> None:
        """Register a :class:`Latch` declared here: :meth:`readout` leaves out its entries while it is known free."""
        self._latches.append(latch)

    def readout(self) -> dict[str, Tensor]:
        """The tensors declared with ``readout=True``, flattened to 1-D float32.

        The entries of a :class:`Latch` that the host knows is free (nothing latched since its last read) are
        left out: their values are known (:meth:`Latch.fired` finds nothing without them).
        """
        t = self._require()
        read = {n: t[n] for n in self._readout_names}
        for latch in self._latches:
            if t[latch.names[0]] is not latch._free:  # not known free (Latch.known_free, inlined)
                for n in latch.names:
                    read[n] = t[n]
        object.__setattr__(self, "_read", read)
        return {n: _flat32(v) for n, v in read.items()} if read else read

    def last_read(self, name: str) -> Tensor | None:
        """The tensor the last :meth:`readout` returned under ``name`` (the object, not a copy), if any."""
        return self._read.get(name)

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Persistent tensors (clones), nested by dotted name; ``{}`` before bind and load."""
        if self._tensors is None:
            return {} if self._loaded is None else _nest({k: v.clone() for k, v in self._loaded.items()})
        return _nest({n: self._tensors[n].clone() for n, d in self._decls.items() if d.persistent})

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = False) -> None:
        """Restore :meth:`state_dict` (nested or flat); before :meth:`bind`, kept until it.

        Args:
            state: what :meth:`state_dict` returned. Unknown names are ignored; missing ones keep
                their current value unless ``strict``.
            strict: raise when a persistent name is missing.

        Raises:
            ValueError: ``strict`` and a persistent name is missing, or a tensor's shape differs.
        """
        flat = _flatten(state)
        if strict:
            missing = [n for n, d in self._decls.items() if d.persistent and n not in flat]
            if missing:
                raise ValueError(f"`state` lacks {missing}")
        loaded = {n: torch.as_tensor(v).detach().clone() for n, v in flat.items()}
        if self._tensors is None:  # names may not be declared yet: keep everything until bind
            object.__setattr__(self, "_loaded", {**(self._loaded or {}), **loaded})
        else:
            self._apply(loaded)

    def _apply(self, loaded: Mapping[str, Tensor]) -> None:
        t = self._require()
        for n, v in loaded.items():
            if n not in t or not self._decls[n].persistent:
                continue
            if v.shape != t[n].shape:
                raise ValueError(
                    f"`state` holds {n!r} of shape {tuple(v.shape)} but this detector keeps {tuple(t[n].shape)}"
                )
            t[n] = v.to(device=t[n].device, dtype=t[n].dtype)

    # -- access
    def _require(self) -> dict[str, Tensor]:
        if self._tensors is None:
            raise RuntimeError("the device state is not allocated yet: call bind(device) first")
        return self._tensors

    def __getitem__(self, name: str) -> Tensor:
        return self._require()[name]

    def __setitem__(self, name: str, value: Tensor) -> None:
        if name not in self._decls:
            raise KeyError(f"state {name!r} is not declared; declared: {self.names}")
        self._require()[name] = value

    def __getattr__(self, name: str) -> Tensor:
        decls = object.__getattribute__(self, "_decls")
        if name in decls:
            return self[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._decls:
            self[name] = value
        else:
            object.__setattr__(self, name, value)


class Fired(NamedTuple):
    """One latched entry as the host sees it.

    Attributes:
        index: the entry (layer index for a per-layer latch, 0 for a model-wide one).
        step: the step it fired at.
        value: its ``value`` (NaN when the latch keeps none).
        values: every latched value by name (a list for a vector-valued single entry).
    """

    index: int
    step: int
    value: float
    values: dict[str, Any]


class Latch:
    """The "fired at step" latch: the first step (and values) at which something happened since the last read.

    ``n`` independent entries (one per layer, or one for a model-wide condition). An entry that has
    fired keeps its step and values until :meth:`fired` reads it, so a condition seen between two
    logging steps is reported with its own step, once.

    Args:
        state: where the tensors are declared (``<name>.fired_step``, ``<name>.fired_<value>``).
        name: the latch's name in ``state``.
        n: number of entries.
        values: latched values and their width per entry (``None``: one per entry, like the step;
            an int ``k``: a ``k``-vector for a single-entry latch, e.g. the layers that were non-finite).
    """

    def __init__(
        self, state: DeviceState, name: str, n: int, values: Mapping[str, int | None] | Sequence[str] = ("value",)
    ) -> None:
        self.state, self.name, self.n = state, name, n
        items = values.items() if isinstance(values, Mapping) else ((v, None) for v in values)
        self.values: dict[str, int | None] = dict(items)  # None: one value per entry
        state.add_state(f"{name}.fired_step", lambda dev: torch.full((n,), -1.0, device=dev), readout=True)
        for v, width in self.values.items():
            size = n if width is None else width
            state.add_state(f"{name}.fired_{v}", lambda dev, k=size: torch.zeros(k, device=dev), readout=True)
        self._free: Tensor | None = None  # the fired_step tensor the host knows holds no entry (all -1)
        self.names = (f"{name}.fired_step", *(f"{name}.fired_{v}" for v in self.values))  # its readout entries
        state.add_latch(self)

    @property
    def known_free(self) -> bool:
        """Whether the host knows that no entry is latched (nothing latched since the read that found none)."""
        return self.step is self._free

    @property
    def step(self) -> Tensor:
        """float32[n]: the step each entry fired at, ``-1`` where it has not."""
        return self.state[f"{self.name}.fired_step"]

    def update(self, take: Tensor, step: Tensor, **values: Tensor) -> Tensor:
        """Latch ``values`` at ``step`` where ``take`` holds and the entry is still free (device only).

        Returns:
            The entries latched now (bool[n]).
        """
        take = take if take.dim() <= 1 else take.reshape(-1)
        free = self.step is self._free  # nothing latched since the host read it: every entry is free
        first = take if free else take & (self.step < 0)  # (2 ops fewer on a free latch)
        self._free = None
        self.state[f"{self.name}.fired_step"] = torch.where(first, step, self.step)
        for v, t in values.items():
            key = f"{self.name}.fired_{v}"
            # Bool and integer values promote to the state's float32 inside where (no conversion op).
            v = t.to(torch.float32) if t.is_floating_point() and t.dtype != torch.float32 else t
            self.state[key] = torch.where(first, v, self.state[key])
        return first

    def fired(self, values: Mapping[str, list[float]]) -> list[Fired]:
        """The latched entries in the read-back ``values`` (by index), and free the latch.

        Without the latch's entries in ``values`` (:meth:`DeviceState.readout` left them out: known free), none.
        """
        steps = values.get(self.names[0])
        if steps is None:  # not read: known free at the readout (and nothing ran on the device since)
            return []
        if not steps or max(steps) < 0:  # nothing latched: the latch is free already (no device op, no walk)
            read = self.state.last_read(f"{self.name}.fired_step")
            self._free = read if read is self.step else None  # what was read is still the state: known free
            return []
        self.clear()
        cols = {v: values[f"{self.name}.fired_{v}"] for v in self.values}
        out = []
        for i, s in enumerate(steps):
            if s < 0:
                continue
            vals = {v: col[i] if self.values[v] is None else col for v, col in cols.items()}
            value = vals.get("value", math.nan)
            out.append(Fired(i, int(s), float(value) if isinstance(value, float) else math.nan, vals))
        return out

    def clear(self) -> None:
        """Free every entry (the host has read them)."""
        self.state[f"{self.name}.fired_step"] = torch.full_like(self.step, -1.0)
        self._free = self.step


class Persistence:
    """A condition must hold ``persist`` consecutive steps (a device streak) before it is latched.

    Severity-scaled persistence: where ``immediate`` holds (a condition so severe that waiting
    would only let it do harm), the entry fires on the step it is seen, whatever its streak.

    Args:
        state: where the tensors are declared (``<name>.streak`` and the latch's).
        name: its name in ``state``.
        n: number of entries (layers, or 1 for a model-wide condition).
        persist: consecutive steps required.
    """

    def __init__(self, state: DeviceState, name: str, n: int, persist: int) -> None:
        self.persist = persist
        self.name = name
        self._state = state
        state.add_state(f"{name}.streak", lambda dev: torch.zeros(n, device=dev))
        self.latch = Latch(state, name, n)

    @property
    def streak(self) -> Tensor:
        """float32[n]: consecutive steps the condition has held."""
        return self._state[f"{self.name}.streak"]

    def update(self, cond: Tensor, value: Tensor, step: Tensor, immediate: Tensor | None = None) -> Tensor:
        """Advance the streaks with this step's condition and value (device only).

        Args:
            cond: bool[n] (or broadcastable): whether the condition holds this step.
            value: the figure to report should the entry fire now.
            step: this step's number (float32 device scalar).
            immediate: bool, where set the entry fires now (severity-scaled persistence).

        Returns:
            The entries latched now (bool[n]).
        """
        streak = (self.streak + 1.0) * cond
        self._state[f"{self.name}.streak"] = streak
        take = streak >= self.persist
        if immediate is not None:
            take = take | immediate
        return self.latch.update(take, step, value=value)

    def update_window(self, cond: Tensor, value: Tensor, steps: Tensor, immediate: Tensor | None = None) -> None:
        """:meth:`update` for ``T`` consecutive steps at once, vectorised over them (device only).

        The streak of each entry at row ``t`` is the number of rows since its condition last failed
        (plus the streak carried in when it has not failed in the window); the first row whose
        streak reaches ``persist`` (or whose ``immediate`` is set) is latched, as ``T`` calls of
        :meth:`update` would.

        Args:
            cond: bool[T, n], oldest step first.
            value: [T, n] figures to report.
            steps: float32[T], the rows' step numbers.
            immediate: bool[T, n] or ``None``.
        """
        if cond.shape[0] == 1:  # one step (log_every=1): the step-by-step form is 4x fewer ops
            self.update(cond[0], value[0], steps, None if immediate is None else immediate[0])  # [1] broadcasts
            return
        t = torch.arange(cond.shape[0], device=cond.device, dtype=torch.float32).unsqueeze(1)
        last_false = torch.where(cond, constant(-1.0, cond.device), t).cummax(0).values  # -1: held on every row so far
        streak = t - last_false + (last_false < 0) * self.streak
        fire = streak >= self.persist
        if immediate is not None:
            fire = fire | immediate
        first = fire.to(torch.uint8).argmax(0)  # the first row that fires (0 when none does)
        at = first.unsqueeze(0)
        self.latch.update(fire.any(0), steps[first], value=value.gather(0, at).squeeze(0))
        self._state[f"{self.name}.streak"] = streak[-1]

    def fired(self, values: Mapping[str, list[float]]) -> list[Fired]:
        """See :meth:`Latch.fired`."""
        return self.latch.fired(values)


class Window:
    """The evidence of the steps since the last fold, held by reference: recording a step costs no device op.

    Every finding is read at a logging step, so a check need not run on the step it looks at: a
    detector may :meth:`add` each step's evidence and fold the whole window at once, vectorised
    over its steps, in :meth:`Detector.readout` (or earlier, when the window is full, still
    without a host read). Each tensor op costs a kernel launch on a GPU and microseconds of
    dispatch on a CPU; folded, ``T`` steps cost what one step costs.

    Args:
        capacity: steps after which :meth:`add` asks for a fold (bounds the evidence kept alive).
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self.rows: list[StepEvidence] = []

    def add(self, ev: StepEvidence) -> bool:
        """Keep ``ev``; ``True`` when the window is full and should be folded now."""
        self.rows.append(ev)
        return len(self.rows) >= self.capacity

    def take(self) -> list[StepEvidence]:
        """The rows kept so far (oldest first), and start a new window."""
        rows, self.rows = self.rows, []
        return rows

    def __len__(self) -> int:
        return len(self.rows)


class Series:
    """One device scalar per step, recorded by reference and read at the next logging step as one tensor.

    For a sequential recursion that cannot be vectorised over steps (an EMA with winsorisation, a
    running best): record each step's scalar here (no device op), put :meth:`readout` in the
    detector's readout, and run the recursion on the host in ``collect`` over ``zip(values, steps)``.
    It costs no kernel launch at all and microseconds of Python at logging steps.

    Args:
        chunk: scalars after which the kept references are stacked into one tensor (bounds the
            number of tensors alive between two reads; one stack, no host read).
    """

    def __init__(self, chunk: int = 64) -> None:
        self.chunk = chunk
        self._values: list[Tensor] = []
        self._chunks: list[Tensor] = []
        self._steps: list[int] = []
        self._read: list[int] = []

    def add(self, value: Tensor, step: int) -> None:
        """Record this step's 0-d ``value`` for step number ``step`` (a host int)."""
        self._values.append(value)
        self._steps.append(step)
        if len(self._values) >= self.chunk:
            self._chunks.append(torch.stack(self._values).to(torch.float32))
            self._values = []

    def readout(self) -> Tensor | None:
        """The values recorded since the last read (``None`` when there are none): float32[T], or the one value
        itself, 0-d as recorded, when there is one (no op: the transfer flattens and converts its entries)."""
        values, chunks = self._values, self._chunks
        self._values, self._chunks = [], []
        if self._read:
            self._read += self._steps
        else:
            self._read = self._steps
        self._steps = []
        if not chunks:
            if len(values) == 1:  # one step (log_every=1): the scalar as it is
                return values[0]
            return torch.stack(values).to(torch.float32) if values else None
        parts = [*chunks, torch.stack(values).to(torch.float32)] if values else chunks
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def take(self) -> list[float]:
        """:meth:`readout` read on the host now (one host read; checkpoints), as float32 values."""
        t = self.readout()
        return [] if t is None else t.to(torch.float32).reshape(-1).tolist()

    def steps(self) -> list[int]:
        """The step numbers of what :meth:`readout` returned (since the last call), oldest first."""
        out, self._read = self._read, []
        return out

    def __len__(self) -> int:
        return len(self._steps)  # steps recorded and not read yet


def stacked(rows: Sequence[StepEvidence], name: str, get: Callable[[StepEvidence], Tensor]) -> Tensor:
    """``torch.stack([get(ev) for ev in rows])``, computed once for every detector folding these rows.

    Rows whose ``get`` is the very same tensor object (the present-mask, the last weight norms)
    are not stacked: the result is then that tensor with a leading dimension of 1, which
    broadcasts against the ``[T, ...]`` stacks.
    """

    def make() -> Tensor:
        items = [get(ev) for ev in rows]
        if all(x is items[0] for x in items):  # also one row (log_every=1): a view, no copy
            return items[0].unsqueeze(0)
        return torch.stack(items)

    return rows[-1].derived(("window", name, id(rows[0]), len(rows)), make)


def window_steps(rows: Sequence[StepEvidence], device: torch.device) -> Tensor:
    """float32[T]: the rows' step numbers on ``device`` (from the host; no device read)."""

    def make() -> Tensor:
        if len(rows) == 1:  # one step (log_every=1): filled where it lives, no host tensor to copy
            return torch.full((1,), float(rows[0].stats.step), dtype=torch.float32, device=device)
        host = torch.tensor([float(ev.stats.step) for ev in rows], dtype=torch.float32)
        return host.to(device, non_blocking=True)

    return rows[-1].derived(("window", "steps", id(rows[0]), len(rows)), make)


class Detector(ABC):
    """Base class of detectors: declare state in :meth:`bind`, fold evidence in :meth:`update`,
    turn read-back values into findings in :meth:`collect`.

    The default :meth:`readout` returns every tensor declared with ``readout=True`` (the latches'),
    and the default :meth:`state_dict`/:meth:`load_state_dict` the persistent declared state.

    Example::

        class BandDetector(Detector):
            def bind(self, ctx):
                super().bind(ctx)
                self.out = Persistence(self.state, "out", 1, persist=3)
                self.state.bind(ctx.device)

            def update(self, ev):
                g = ev.stats.grad_norm[self.index]
                self.out.update((g < self.low) | (g > self.high), g, ev.step)

            def collect(self, values, step):
                return [Finding("band", "out", f.step, ...) for f in self.out.fired(values)]
    """

    def __init__(self) -> None:
        self.state = DeviceState()
        self.ctx: DetectorContext | None = None

    def bind(self, ctx: DetectorContext) -> None:
        """Keep the context; subclasses declare their state, then call ``self.state.bind(ctx.device)``."""
        self.ctx = ctx
        fresh = DeviceState()  # bind may run again (a new monitor): declarations start over
        object.__setattr__(fresh, "_loaded", None if self.state.bound else self.state._loaded)
        self.state = fresh

    @abstractmethod
    def update(self, ev: StepEvidence) -> None:
        """Fold this step's evidence into the device state (device only)."""

    def readout(self) -> dict[str, Tensor]:
        """Named 1-D float tensors to read back at the next logging step."""
        return self.state.readout() if self.state.bound else {}

    @abstractmethod
    def collect(self, values: dict[str, list[float]], step: int) -> list[Finding]:
        """Turn the read-back values (by name, as :meth:`readout` named them) into findings."""

    def state_dict(self) -> dict[str, Any]:
        """Running state as nested dicts of tensors (for checkpoints)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before or after :meth:`bind`)."""
        self.state.load_state_dict(state)

    def __repr__(self) -> str:
        return type(self).__name__
