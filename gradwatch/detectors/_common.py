"""Helpers shared by the built-in detectors (not part of the framework's public surface)."""

from __future__ import annotations

import math
from abc import abstractmethod
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

__all__ = ["GradWindow", "UpdateLossSeries", "WindowedChecks", "fmt", "grad_window", "side_by_side"]


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


class FigureRows:
    """A detector's model-wide figures, ``k`` per step, kept on the device until the logging step reads them.

    Each fold adds a float32 ``[T, k]`` block with its steps' numbers (no device read); :meth:`readout`
    hands the blocks over as one flat tensor for the one transfer, and :meth:`read_steps` gives the steps
    of what it handed over, for the host checks in ``collect``. :meth:`take_pending` brings figures not
    read yet to the host (one read: checkpoints only).
    """

    def __init__(self) -> None:
        self._blocks: list[Tensor] = []
        self._steps: list[int] = []  # steps of the blocks not read out yet
        self._read: list[int] = []  # steps of the figures read out, not collected yet

    def add(self, figures: Tensor, steps: list[int]) -> None:
        """Record one fold's ``[T, k]`` figures for steps ``steps`` (host ints, oldest first)."""
        self._blocks.append(figures)
        self._steps.extend(steps)

    def readout(self) -> Tensor | None:
        """float32[T * k]: the figures recorded since the last read, oldest first (``None``: none)."""
        if not self._blocks:
            return None
        figures = self._blocks[0] if len(self._blocks) == 1 else torch.cat(self._blocks)
        self._read += self._steps
        self._blocks, self._steps = [], []
        return figures.reshape(-1)

    def read_steps(self) -> list[int]:
        """The step numbers of the figures :meth:`readout` handed over since the last call."""
        out, self._read = self._read, []
        return out

    def take_pending(self) -> tuple[list[int], list[float]] | None:
        """The figures not read out yet, on the host (one read), with their steps; ``None`` when none."""
        if not self._blocks:
            return None
        steps, values = self._steps, torch.cat(self._blocks).reshape(-1).tolist()
        self._blocks, self._steps = [], []
        return steps, values


class UpdateLossSeries(Detector):
    """Weighs each logging step's largest update-to-weight ratio against the loss, on the host.

    Every step's loss and every measured update (:class:`~gradwatch.evidence.UpdateTracker`, once per
    logging step) are recorded by reference: no device op on the step. At a logging step both are read
    back, merged by step, and handed to the subclass's host recursion :meth:`fold`, whose running
    statistics (the attributes named in ``state_keys``) are checkpointed as float64 tensors.
    """

    state_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.updates, self.losses = Series(), Series()

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        self.updates, self.losses = Series(), Series()

    def largest(self, ratio: Tensor) -> Tensor:
        """The measurement of one update: its largest per-layer ratio (NaN, no measurement, as 0; Inf kept)."""
        return ratio.nan_to_num(0.0, math.inf, -math.inf).amax()  # 2 ops (isnan + where + amax dispatched 4)

    def update(self, ev: StepEvidence) -> None:
        if ev.loss is not None:
            self.losses.add(ev.loss, ev.stats.step)
        if ev.update_ratio is not None:  # once per logging step: the step after it
            self.updates.add(self.largest(ev.update_ratio), ev.stats.step - 1)

    def readout(self) -> dict[str, Tensor]:
        out = {}
        losses, updates = self.losses.readout(), self.updates.readout()
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

    def fired(self, losses: list[float], updates: list[float]) -> list[tuple[int, float]]:
        """:meth:`fold` the read-back losses and measurements with the steps they were recorded at."""
        return self.fold(losses, self.losses.steps(), updates, self.updates.steps())

    def state_dict(self) -> dict[str, Any]:
        """The host statistics as float64 tensors (values not read yet are folded first: one host read)."""
        losses, updates = self.losses.readout(), self.updates.readout()
        self.fired(losses.tolist() if losses is not None else [], updates.tolist() if updates is not None else [])
        return {k: torch.tensor(getattr(self, k), dtype=torch.float64) for k in self.state_keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.state_keys:
            if k in state:
                setattr(self, k, float(state[k]))
