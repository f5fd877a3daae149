"""A logging step's detector fold dispatches a bounded number of tensor ops, whatever the depth and the window.

At a logging step every detector's ``readout()`` folds the steps recorded since the last one (vectorised
over them) and hands its named tensors to the one transfer. Every op is a kernel launch on a GPU and
microseconds of dispatch on a CPU, so the fold must cost the same for 2 or 48 layers, and for a window
of 1, 10 or 25 steps. Counted with a ``TorchDispatchMode`` (every ATen op, views included) around the
default detectors' ``readout()`` and ``collect()`` calls inside ``monitor.step()``, after the growth check's warm-up.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch as gw

# Measured on CPU (torch 2.13): no op per logging step with log_every=1, for 2 or 48 layers (before this
# test: ~300; Exploding alone 153; 98 before Vanishing's model-wide checks moved to the host, latches read empty
# skipped their free-entry test and NoGradient's all-present windows folded on the host; 69 before Vanishing,
# Exploding and NonFinite checked every step on the host from the raw figures in the transfer; 7 before a single
# recorded loss or norm went to the transfer as it is and the update measurements were reduced on the host).
MAX_OPS_LOG_EVERY_1 = 0
# A window of T > 1 steps folds in the same ops for any T (one stack per input, vectorised over the steps):
# measured 9 for T = 10 or 25 (143, 102, then 11 before). The limit leaves a margin of a few ops.
MAX_OPS_WINDOW = 11


class ReadoutOps(TorchDispatchMode):
    """Counts the ops dispatched while a detector's ``readout()`` or ``collect()`` runs, by detector."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self.current is not None:
            self.ops[self.current] += 1
        return func(*args, **(kwargs or {}))

    def watch(self, detector: Any) -> None:
        for name in ("readout", "collect"):
            method: Callable[..., Any] = getattr(detector, name)

            def counted(*args: Any, method: Callable[..., Any] = method) -> Any:
                self.current = type(detector).__name__
                try:
                    return method(*args)
                finally:
                    self.current = None

            setattr(detector, name, counted)


def mlp(depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def readout_ops(depth: int, log_every: int) -> collections.Counter[str]:
    """Ops of the detectors' readouts per logging step, over the 2 logging steps after step 40."""
    torch.manual_seed(0)
    model = mlp(depth)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=log_every)
    x, y = torch.randn(8, 16), torch.randn(8, 2)
    counter = ReadoutOps()
    start = 40 // log_every * log_every + log_every  # the first logging step after 40 (past every warm-up)
    for step in range(start + log_every + 1):
        if step == start - log_every + 1:  # from the step after a logging step: whole windows only
            for d in monitor.detectors:
                counter.watch(d)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        with counter:
            monitor.step(loss=loss, optimizer=opt)
        opt.step()
    monitor.close()
    return collections.Counter({k: n // 2 for k, n in counter.ops.items()})


@pytest.mark.parametrize("depth", [2, 48], ids=["shallow", "deep"])
def test_logging_step_fold_ops_are_bounded(depth: int) -> None:
    ops = readout_ops(depth, 1)
    assert sum(ops.values()) <= MAX_OPS_LOG_EVERY_1, ops.most_common()
    # One step's own tensors go to the transfer as they are: the checks run on the host (41, 18 and 3 ops before).
    assert ops["Vanishing"] == ops["Exploding"] == ops["NonFinite"] == 0, ops.most_common()
    # Every layer present, none unreached, no activations tracked: the host knows no layer is missing.
    assert ops["NoGradient"] == 0, ops.most_common()


def test_logging_step_fold_ops_do_not_grow_with_depth_or_window() -> None:
    per_step = readout_ops(2, 1)
    assert readout_ops(48, 1) == per_step
    window = readout_ops(2, 10)
    assert sum(window.values()) <= MAX_OPS_WINDOW, window.most_common()
    # One stack per column (the squared gradient norms shared by Vanishing and Exploding): the total norm,
    # the non-finite flags and which layers.
    assert (window["Vanishing"], window["Exploding"], window["NonFinite"]) == (1, 1, 2), window.most_common()
    # One stack of the window's losses (and norms); the window's one update measurement goes over as it is.
    assert (window["Spike"], window["LossDivergence"], window["SmallUpdates"], window["Oscillation"]) == (1, 2, 1, 1)
    assert readout_ops(48, 10) == window  # not per layer
    assert readout_ops(2, 25) == window  # not per step of the window
