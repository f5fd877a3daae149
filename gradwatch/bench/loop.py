"""The training loop the cases share, written against gradwatch's public API only.

Every case trains with ``gw.GradWatch(model, sinks=[], on_alert="ignore", track_activations=True)``:
the default detectors and thresholds, no output, alerts collected from ``monitor.alerts``. Activation
tracking is on for every case, faulty or control, so dead and saturated units can be detected and
the controls test those detectors for false alarms too. Each step passes the loss and the optimizer
(``monitor.step(loss=..., optimizer=...)``) where the installed gradwatch accepts them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

import gradwatch as gw
from gradwatch.bench.registry import AlertRecord, Trial

__all__ = [
    "BENCH_OPTIONS", "Batches", "LossFn", "adam", "monitor_for", "seeded", "sgd", "train", "trial_from", "watch_step",
]

#: The options every case's monitor gets (a case may add its own, e.g. ``track_time``).
BENCH_OPTIONS: dict[str, Any] = {"sinks": [], "on_alert": "ignore", "track_activations": True}

Batches = Callable[[int], tuple[Any, Tensor]]
LossFn = Callable[[Any, Tensor], Tensor]


def seeded(seed: int) -> None:
    """Seed torch's global generator (model init, dropout) before building a case's model."""
    torch.manual_seed(seed)


def monitor_for(model: nn.Module, **options: Any) -> gw.GradWatch:
    """A monitor with the bench's options (:data:`BENCH_OPTIONS`), updated by ``options``."""
    return gw.GradWatch(model, **{**BENCH_OPTIONS, **options})


def _step_keywords() -> frozenset[str]:
    try:
        return frozenset(inspect.signature(gw.GradWatch.step).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a C-implemented step
        return frozenset()


def watch_step(monitor: gw.GradWatch, loss: Tensor | None, optimizer: torch.optim.Optimizer | None) -> None:
    """``monitor.step(loss=..., optimizer=...)``, passing what this gradwatch's ``step`` accepts."""
    accepted = _step_keywords()
    kw: dict[str, Any] = {}
    if "loss" in accepted and loss is not None:
        kw["loss"] = loss.detach()
    if "optimizer" in accepted and optimizer is not None:
        kw["optimizer"] = optimizer
    monitor.step(**kw)


def trial_from(monitor: gw.GradWatch, steps: int, seed: int = 0) -> Trial:
    """Close ``monitor`` (emitting what is pending) and record its alerts as a :class:`Trial`."""
    monitor.close()
    return Trial(tuple(AlertRecord.from_alert(a) for a in monitor.alerts), steps, seed)


def train(
    model: nn.Module,
    batches: Batches,
    loss_fn: LossFn,
    *,
    steps: int,
    optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer],
    seed: int = 0,
    params: Callable[[nn.Module], Iterator[nn.Parameter]] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    zero_grad: bool = True,
    set_to_none: bool = True,
    micro_batches: int = 1,
    options: dict[str, Any] | None = None,
    after: Callable[[nn.Module], None] | None = None,
) -> Trial:
    """Train ``model`` the way a user's loop does, with gradwatch watching.

    One optimizer step: ``micro_batches`` forward/backward passes (the loss divided by their number,
    real gradient accumulation), ``monitor.step``, ``optimizer.step()``, then ``zero_grad`` unless
    the case leaves it out.

    Args:
        model: the model (built after :func:`seeded`).
        batches: ``batches(i)`` returns the ``i``-th micro-batch ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets)``.
        steps: optimizer steps.
        optimizer: builds the optimizer from the parameters.
        seed: recorded in the trial.
        params: which parameters the optimizer gets (default: those requiring grad).
        forward: ``forward(model, inputs)`` (default: ``model(inputs)``).
        zero_grad: call ``optimizer.zero_grad`` after each step (``False``: the missing-zero_grad bug).
        set_to_none: passed to ``zero_grad``.
        micro_batches: backward passes per optimizer step.
        options: further ``GradWatch`` options.
        after: called with the model after training (an oracle's probe), before the monitor closes.

    Returns:
        The :class:`Trial`.
    """
    chosen = params(model) if params is not None else (p for p in model.parameters() if p.requires_grad)
    opt = optimizer(chosen)
    monitor = monitor_for(model, **(options or {}))
    model.train()
    try:
        for step in range(steps):
            loss = None
            for k in range(micro_batches):
                x, y = batches(step * micro_batches + k)
                out = forward(model, x) if forward is not None else model(x)
                loss = loss_fn(out, y) / micro_batches
                loss.backward()
            watch_step(monitor, loss, opt)
            opt.step()
            if zero_grad:
                opt.zero_grad(set_to_none=set_to_none)
        if after is not None:
            after(model)
    finally:
        trial = trial_from(monitor, steps, seed)
    return trial


def adam(lr: float = 1e-3, **kw: Any) -> Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]:
    """An ``Adam`` factory."""
    return lambda ps: torch.optim.Adam(list(ps), lr=lr, **kw)


def sgd(lr: float, momentum: float = 0.0, **kw: Any) -> Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]:
    """An ``SGD`` factory."""
    return lambda ps: torch.optim.SGD(list(ps), lr=lr, momentum=momentum, **kw)
