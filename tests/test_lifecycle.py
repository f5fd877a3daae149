"""Hooks: attach/watch install them, close() removes every one, and the model pickles afterwards."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_pre_hooks

import gradwatch as gw


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))


def _hook_counts(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    counts = {"forward_pre": 0, "forward": 0, "backward": 0, "tensor": 0}
    for m in model.modules():
        counts["forward_pre"] += len(m._forward_pre_hooks)
        counts["forward"] += len(m._forward_hooks)
        counts["backward"] += len(m._backward_hooks) + len(m._backward_pre_hooks)
    for p in model.parameters():
        counts["tensor"] += len(p._backward_hooks or {})
    counts["optimizer_pre"] = len(opt._optimizer_step_pre_hooks)
    counts["global_optimizer_pre"] = len(_global_optimizer_pre_hooks)
    return counts


NO_HOOKS = {"forward_pre": 0, "forward": 0, "backward": 0, "tensor": 0, "optimizer_pre": 0, "global_optimizer_pre": 0}


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, monitor: gw.GradWatch | None = None) -> None:
    for _ in range(steps):
        model(torch.randn(4, 4)).square().mean().backward()
        if monitor is not None:
            monitor.step()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mode", ["explicit", "attach", "watch", "watch_all"])
def test_close_removes_every_hook_and_model_pickles(mode):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_counts(model, opt)
    assert before == NO_HOOKS
    if mode == "explicit":
        monitor = gw.GradWatch(model, sinks=[], track_activations=True)
        _train(model, opt, 3, monitor)
    elif mode == "attach":
        monitor = gw.GradWatch(model, sinks=[], track_activations=True)
        handle = monitor.attach(opt)
        _train(model, opt, 3)
        assert _hook_counts(model, opt)["optimizer_pre"] == 1
        assert isinstance(handle, torch.utils.hooks.RemovableHandle)
    elif mode == "watch":
        monitor = gw.watch(model, opt, sinks=[], track_activations=True)
        _train(model, opt, 3)
    else:
        monitor = gw.watch(model, sinks=[], track_activations=True)
        assert _hook_counts(model, opt)["global_optimizer_pre"] == 1
        _train(model, opt, 3)
    assert monitor.step_count == 3
    # Activation hooks stay while monitoring; the forward-order hooks went at the first step.
    live = _hook_counts(model, opt)
    # ReLU and Sigmoid; the input-scale pre-hook on the model (issue 11), armed on logging steps only.
    assert (live["forward"], live["forward_pre"]) == (2, 1)
    monitor.close()
    monitor.close()  # idempotent
    assert _hook_counts(model, opt) == NO_HOOKS
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 4)
    assert torch.equal(clone(x), model(x))
    with pytest.raises(RuntimeError, match="this GradWatch monitor is closed; create a new one"):
        monitor.step()


def test_context_manager_closes_and_steps_once_per_optimizer_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, sinks=[]) as monitor:
        _train(model, opt, 5)
        assert monitor.step_count == 5
    assert _hook_counts(model, opt) == NO_HOOKS


def test_removing_the_attach_handle_detaches_and_is_harmless_twice():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gw.GradWatch(model, sinks=[])
    handle = monitor.attach(opt)
    _train(model, opt, 2)
    handle.remove()
    handle.remove()
    _train(model, opt, 2)
    assert monitor.step_count == 2
    monitor.close()


def test_watch_without_optimizer_ignores_other_models_optimizers():
    model, other = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with gw.watch(model, sinks=[]) as monitor:
        _train(model, opt, 2)
        _train(other, other_opt, 3)
        assert monitor.step_count == 2
