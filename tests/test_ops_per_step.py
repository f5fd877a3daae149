"""A non-logging step adds at most 40 tensor ops to a training iteration, whatever the model's depth.

Every tensor op is a kernel launch on a GPU (a few microseconds each) and microseconds of dispatch on
a CPU, so the per-step cost of leaving gradwatch on is decided by how many ops ``step()`` dispatches
on the steps that log nothing. Counted with a ``TorchDispatchMode`` (every ATen op, views included):
one full iteration (forward, backward, ``monitor.step``, ``optimizer.step``) with the monitor, minus
the same iteration without it, on a shallow and a deep model with the default detectors and
``on_nonfinite`` at its default. A change that adds per-layer (or just many) ops to the per-step
path fails here.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch as gw

MAX_OPS = 40


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def mlp(depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def iteration_ops(depth: int, monitored: bool, *, pass_loss: bool, at: int = 3) -> collections.Counter[str]:
    """Ops of one non-logging iteration (after ``at`` steps: the 4th by default; log_every=10 logs step 0 only)."""
    torch.manual_seed(0)
    model = mlp(depth)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore") if monitored else None
    x, y = torch.randn(8, 16), torch.randn(8, 2)

    def one() -> None:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if monitor is not None:
            monitor.step(loss=loss if pass_loss else None, optimizer=opt if pass_loss else None)
        opt.step()

    for _ in range(at):
        one()
    with OpCounter() as counter:
        one()
    if monitor is not None:
        assert monitor.step_count == at + 1
        monitor.close()
    return counter.ops


@pytest.mark.parametrize("pass_loss", [False, True], ids=["step()", "step(loss=, optimizer=)"])
@pytest.mark.parametrize("depth", [2, 48], ids=["shallow", "deep"])
def test_non_logging_step_adds_at_most_40_ops(depth: int, pass_loss: bool) -> None:
    bare = iteration_ops(depth, False, pass_loss=pass_loss)
    watched = iteration_ops(depth, True, pass_loss=pass_loss)
    added = sum(watched.values()) - sum(bare.values())
    extra = watched - bare
    assert added <= MAX_OPS, f"{added} ops added per step: {extra.most_common()}"
    assert added == sum(extra.values())  # the monitor adds ops, it removes none from the iteration


def test_the_same_ops_whatever_the_depth() -> None:
    def added(depth: int) -> collections.Counter[str]:
        return iteration_ops(depth, True, pass_loss=True) - iteration_ops(depth, False, pass_loss=True)

    assert added(2) == added(48)  # op by op: nothing on the per-step path is per layer


MEASURE_OPS = 10  # the update ratio's measure (gradwatch.evidence.UpdateTracker); the detectors take it as it is


@pytest.mark.parametrize("depth", [2, 48], ids=["shallow", "deep"])
def test_the_step_after_a_logging_step_adds_the_update_measure_only(depth: int) -> None:
    """Step 1 measures the update of logging step 0 (the weights' sample against the one taken then): a fixed number
    of ops more than any other non-logging step (26 on this model: 16 + 10), the same whatever the depth."""
    bare = iteration_ops(depth, False, pass_loss=True, at=1)
    watched = iteration_ops(depth, True, pass_loss=True, at=1)
    plain = iteration_ops(depth, True, pass_loss=True) - iteration_ops(depth, False, pass_loss=True)
    added = watched - bare
    assert sum(added.values()) - sum(plain.values()) <= MEASURE_OPS, (added - plain).most_common()
    assert sum(added.values()) <= MAX_OPS


# Ops that only make a new view of existing memory: on a GPU they launch no kernel.
VIEW_OPS = frozenset({"detach", "view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand",
                      "as_strided", "alias", "t", "transpose", "permute", "_reshape_alias", "lift_fresh"})


def logging_step_kernels(depth: int) -> collections.Counter[str]:
    """Ops of monitor.step() on a logging step (step 10), views left out."""
    torch.manual_seed(0)
    model = mlp(depth)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore")
    x, y = torch.randn(8, 16), torch.randn(8, 2)
    for step in range(11):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if step == 10:
            with OpCounter() as counter:
                monitor.step(loss=loss, optimizer=opt)
        else:
            monitor.step(loss=loss, optimizer=opt)
        opt.step()
    monitor.close()
    return collections.Counter({k: n for k, n in counter.ops.items() if k not in VIEW_OPS})


def test_logging_step_grows_with_groups_not_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """With foreach kernels for max |g| (the GPU path; the CPU takes one aminmax per tensor, measured faster
    there), a logging step launches the same kernels at depth 2 and 48: one (device, dtype) group either way."""
    from gradwatch import stats

    monkeypatch.setattr(stats, "PER_TENSOR_MAX_DEVICES", ())
    shallow, deep = logging_step_kernels(2), logging_step_kernels(48)
    assert deep == shallow, (deep - shallow).most_common()
