"""The first hour: misuse is named once, and each alert reaches the terminal once."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import gradwatch as gw


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _sigmoid_stack() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, gw.GradWatchWarning)]


def test_watch_plus_explicit_step_counts_each_optimizer_step_once_and_says_so() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gw.watch(model, opt, sinks=[], log_every=1) as monitor:
            steps = []
            for _ in range(12):
                model(torch.randn(3, 4)).square().mean().backward()
                steps.append(monitor.step().step)  # leftover explicit call
                opt.step()
                opt.zero_grad()
    assert steps == list(range(12))
    assert monitor.step_count == 12
    assert [h["step"] for h in monitor.history] == [float(s) for s in range(12)]
    assert _ours(caught) == [
        "gradwatch: monitor.step() was called explicitly and the monitor is also attached to SGD.step() "
        "(gw.watch / attach), so both ran for step 0; the attached run is ignored. Remove the explicit "
        "monitor.step() call (or do not attach)."
    ]


def test_optimizer_owning_none_of_the_model_is_an_error() -> None:
    model, other = _mlp(0), _mlp(1)
    foreign = torch.optim.SGD(other.parameters(), lr=0.1)
    message = (
        "`optimizer` (SGD) holds none of the 4 trainable parameters of Sequential: it would never apply the "
        "gradients gradwatch watches. Build it over this model's parameters (e.g. SGD(model.parameters(), ...)) "
        "or watch the model it trains."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        gw.watch(model, foreign, sinks=[])
    monitor = gw.GradWatch(model, sinks=[])
    with pytest.raises(ValueError, match=re.escape(message)):
        monitor.attach(foreign)
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match=re.escape(message)):
        monitor.step(optimizer=foreign)
    assert monitor.step_count == 0
    monitor.close()


def test_optimizer_owning_part_of_the_model_is_a_warning_naming_what_it_misses() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(gw.GradWatchWarning) as caught:
        monitor = gw.watch(model, opt, sinks=[])
    assert _ours(caught) == [
        "gradwatch: SGD updates 2 of the 4 trainable parameters of Sequential (not: 2); gradwatch reports the "
        "gradients of all of them. Watch the sub-module this optimizer trains, or use gw.watch(model) to follow "
        "every optimizer."
    ]
    monitor.close()


def test_step_without_any_gradient_is_not_counted_and_warns_once() -> None:
    model = _mlp()
    monitor = gw.GradWatch(model, sinks=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = monitor.step()  # before any backward
        model(torch.randn(3, 4))  # a forward without backward
        second = monitor.step()
    assert (first.step, second.step, monitor.step_count) == (0, 0, 0)
    assert first.metrics is None and first.alerts == []
    assert _ours(caught) == [
        "gradwatch: step() found no gradient on any parameter of Sequential; call it after loss.backward() "
        "(and before optimizer.zero_grad()). This step is not counted."
    ]
    assert caught[0].filename == __file__  # the warning points at the user's line
    model(torch.randn(3, 4)).sum().backward()
    assert monitor.step().step == 0
    monitor.close()


def test_a_single_sink_is_accepted(tmp_path) -> None:
    sink = gw.sinks.JSONL(tmp_path / "one.jsonl")
    monitor = gw.GradWatch(_mlp(), sinks=sink)
    assert monitor.sinks.sinks == [sink]
    monitor.close()


def test_global_step_numbers_the_step_and_later_ones_continue() -> None:
    model = _mlp()
    monitor = gw.GradWatch(model, sinks=[], log_every=5)
    model(torch.randn(3, 4)).sum().backward()
    assert monitor.step(global_step=40).step == 40
    model(torch.randn(3, 4)).sum().backward()
    report = monitor.step()
    assert report.step == 41 and report.metrics is None
    with pytest.raises(ValueError, match=re.escape("`global_step` must be an integer >= 0; got -1")):
        monitor.step(global_step=-1)
    monitor.close()
    assert monitor.closed


def test_loss_is_kept_on_the_device_and_written_on_logging_steps() -> None:
    model = _mlp()
    monitor = gw.GradWatch(model, sinks=[], log_every=2)
    losses = []
    for _ in range(3):
        loss = model(torch.randn(3, 4)).square().mean()
        loss.backward()
        losses.append(loss.item())
        report = monitor.step(loss=loss)
        model.zero_grad()
    assert [h["loss"] for h in monitor.history] == pytest.approx([losses[0], losses[2]], rel=1e-6)
    assert report.metrics is not None and report.metrics["loss"] == pytest.approx(losses[2], rel=1e-6)
    message = "`loss` must be a scalar (one element); got a tensor of shape (2,)"
    with pytest.raises(ValueError, match=re.escape(message)):
        monitor.step(loss=torch.ones(2))
    monitor.close()


def test_with_the_defaults_each_alert_is_one_block_in_the_terminal(capfd) -> None:
    model = _sigmoid_stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = gw.GradWatch(model, log_every=1)  # sinks=None, on_alert="warn"
        for _ in range(4):
            model(torch.randn(8, 16)).square().mean().backward()
            monitor.step()
            opt.step()
            opt.zero_grad()
        monitor.close()
    out, err = capfd.readouterr()
    assert [a.kind for a in monitor.alerts] == ["vanishing"]
    message = monitor.alerts[0].message
    assert (out + err).count(message) == 1  # the Console block; no logging line, no warning
    assert _ours(caught) == []


def test_without_a_terminal_sink_the_warning_is_the_channel_and_points_at_the_user(capfd) -> None:
    model = _sigmoid_stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = gw.GradWatch(model, sinks=[], log_every=1)
        for _ in range(4):
            model(torch.randn(8, 16)).square().mean().backward()
            monitor.step()
            opt.step()
            opt.zero_grad()
        monitor.close()
    assert _ours(caught) == [monitor.alerts[0].message]
    assert [w.filename for w in caught if issubclass(w.category, gw.GradWatchWarning)] == [__file__]
