"""A logging step's detector fold dispatches a bounded number of tensor ops, whatever the depth and the window.

At a logging step every detector's ``readout()`` folds the steps recorded since the last one (vectorised
over them) and hands its named tensors to the one transfer. Every op is a kernel launch on a GPU and
microseconds of dispatch on a CPU, so the fold must cost the same for 2 or 48 layers, and for a window
of 1, 10 or 25 steps. Counted with a ``TorchDispatchMode`` (every ATen op, views included) around the
default detectors' ``readout()`` calls inside ``monitor.step()``, after the growth check's warm-up.
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

# Measured on CPU (torch 2.13): 69 ops per logging step with log_every=1, for 2 or 48 layers (before this
# test: ~300; Exploding alone 153; 98 before Vanishing's model-wide checks moved to the host, latches read empty
# skipped their free-entry test and NoGradient's all-present windows folded on the host). The limits leave a
# margin of a few ops.
MAX_OPS_LOG_EVERY_1 = 72
# A window of T > 1 steps folds in the same ops for any T (one stack per input, vectorised over the steps):
# measured 102 for T = 10 or 25 (143 before).
MAX_OPS_WINDOW = 106


class ReadoutOps(TorchDispatchMode):
    """Counts the ops dispatched while a detector's ``readout()`` runs, by detector."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self.current is not None:
            self.ops[self.current] += 1
        return func(*args, **(kwargs or {}))

    def watch(self, detector: Any) -> None:
        readout: Callable[[], dict[str, torch.Tensor]] = detector.readout

        def counted() -> dict[str, torch.Tensor]:
            self.current = type(detector).__name__
            try:
                return readout()
            finally:
                self.current = None

        detector.readout = counted


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
    assert ops["Vanishing"] <= 42 and ops["Exploding"] <= 18 and ops["NonFinite"] <= 3, ops.most_common()
    # Every layer present, none unreached, no activations tracked: the host knows no layer is missing.
    assert ops["NoGradient"] == 0, ops.most_common()


def test_logging_step_fold_ops_do_not_grow_with_depth_or_window() -> None:
    per_step = readout_ops(2, 1)
    assert readout_ops(48, 1) == per_step
    window = readout_ops(2, 10)
    assert sum(window.values()) <= MAX_OPS_WINDOW, window.most_common()
    assert readout_ops(48, 10) == window  # not per layer
    assert readout_ops(2, 25) == window  # not per step of the window
