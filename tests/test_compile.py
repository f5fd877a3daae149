"""gradwatch with ``torch.compile(backend="aot_eager")``: same statistics as eager, nothing of
gradwatch in the compiled graph, and no recompiles caused by gradwatch over 10 steps."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import gradwatch as gw

STEPS = 10


class HeadFirst(nn.Module):
    """Registration order (head, body) differs from forward order (body, head)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 1)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make() -> HeadFirst:
    torch.manual_seed(0)
    return HeadFirst()


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(step))


@contextmanager
def dynamo_counted() -> Iterator[dict[str, dict[str, int]]]:
    """Fresh dynamo caches and counters; any recompile raises (``error_on_recompile``)."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield counters
    torch._dynamo.reset()


def train(
    model: nn.Module, call: Callable[[torch.Tensor], torch.Tensor], monitor: gw.GradWatch | None, **_: object
) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(STEPS):
        loss = call(batch(step)).pow(2).mean()
        loss.backward()
        if monitor is not None:
            monitor.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def eager_history(**kw: object) -> tuple[list[str], list[dict[str, float]]]:
    model = make()
    monitor = gw.GradWatch(model, sinks=[], log_every=1, **kw)  # type: ignore[arg-type]
    train(model, model, monitor)
    monitor.close()
    return monitor.layers, list(monitor.history)


def assert_same_history(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), k


def baseline_graph_counts() -> dict[str, int]:
    """What compiling the same model and loop costs without gradwatch."""
    with dynamo_counted() as c:
        model = make()
        train(model, torch.compile(model, backend="aot_eager"), None)
        return dict(c["stats"])


def test_compiled_model_same_statistics_as_eager_and_no_recompiles() -> None:
    layers, want = eager_history()
    assert layers == ["body.0", "body.2", "head"]  # forward order, not registration order
    baseline = baseline_graph_counts()
    with dynamo_counted() as c:
        model = make()
        compiled = torch.compile(model, backend="aot_eager")
        monitor = gw.GradWatch(compiled, sinks=[], log_every=1)
        train(model, compiled, monitor)
        # The forward-order hooks ran at trace time only: the graph holds the model's ops alone.
        assert dict(c["stats"]) == baseline == {"calls_captured": baseline["calls_captured"], "unique_graphs": 1}
        assert dict(c["graph_break"]) == {}
    assert monitor.layers == layers  # the order was recorded while dynamo traced the forward
    assert_same_history(list(monitor.history), want)
    monitor.close()


def test_hooks_of_compiled_modules_stay_until_close_eager_ones_go_at_the_first_step() -> None:
    with dynamo_counted():
        model = make()
        compiled_body = torch.compile(model.body, backend="aot_eager")
        monitor = gw.GradWatch(model, sinks=[], log_every=1)
        model.head(compiled_body(batch(0))).sum().backward()
        monitor.step()
        # Removing a compiled module's hook would change a hook count dynamo guards on (a recompile).
        assert len(model.head._forward_pre_hooks) == 0
        assert [len(m._forward_pre_hooks) for m in model.body] == [1, 1, 1, 1]
        assert monitor.layers == ["body.0", "body.2", "head"]
        model.head(compiled_body(batch(1))).sum().backward()
        monitor.step()  # no recompile (error_on_recompile)
    monitor.close()
    assert [len(m._forward_pre_hooks) for m in model.modules()] == [0] * len(list(model.modules()))


def test_track_activations_under_compile_same_statistics_and_no_recompiles() -> None:
    layers, want = eager_history(track_activations=True)
    with dynamo_counted() as c:
        model = make()
        compiled = torch.compile(model, backend="aot_eager")
        monitor = gw.GradWatch(compiled, sinks=[], log_every=1, track_activations=True)
        train(model, compiled, monitor)
        assert c["stats"]["unique_graphs"] == 1
        assert dict(c["graph_break"]) == {}
    assert monitor.layers == layers
    assert_same_history(list(monitor.history), want)
    monitor.close()


def test_compiled_optimizer_step_keeps_gradwatch_out_of_the_graph() -> None:
    _, want = eager_history()

    def run(with_gradwatch: bool) -> tuple[dict[str, int], gw.GradWatch | None]:
        with dynamo_counted() as c:
            model = make()
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            monitor = gw.watch(model, opt, sinks=[], log_every=1) if with_gradwatch else None
            opt_step = torch.compile(opt.step, backend="aot_eager")
            for step in range(STEPS):
                model(batch(step)).pow(2).mean().backward()
                opt_step()
                opt.zero_grad(set_to_none=True)
            return dict(c["stats"]), monitor

    base, _ = run(False)
    stats, monitor = run(True)
    assert monitor is not None
    assert stats == base  # gradwatch's hook ran eagerly: the compiled step holds the same ops
    assert monitor.step_count == STEPS
    assert_same_history(list(monitor.history), want)
    monitor.close()


def test_step_called_from_compiled_code_runs_eagerly() -> None:
    _, want = eager_history()
    with dynamo_counted():
        model = make()
        monitor = gw.GradWatch(model, sinks=[], log_every=1)
        compiled_step = torch.compile(monitor.step, backend="aot_eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        reports = []
        for step in range(STEPS):
            model(batch(step)).pow(2).mean().backward()
            reports.append(compiled_step())
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert [r.step for r in reports] == list(range(STEPS))
    assert_same_history(list(monitor.history), want)
    monitor.close()


def test_gradwatch_itself_never_imports_dynamo() -> None:
    # Recording the forward order compile-safely must not cost plain runs dynamo's import (seconds).
    # (torch.optim imports it by itself, so this loop has no optimizer.)
    code = (
        "import sys, torch, gradwatch as gw\n"
        "m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))\n"
        "mon = gw.GradWatch(m, sinks=[], log_every=1, track_activations=True)\n"
        "for _ in range(2):\n"
        "    m(torch.ones(1, 2)).sum().backward(); mon.step()\n"
        "mon.close()\n"
        "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
