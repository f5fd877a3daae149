"""Alert policies (on_alert) and de-duplication of persisting conditions."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradwatch as gw


def _sigmoid_stack() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def _train(monitor: gw.GradWatch, model: nn.Module, steps: int) -> list[gw.StepReport]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reports = []
    for _ in range(steps):
        model(torch.randn(8, 16)).square().mean().backward()
        reports.append(monitor.step())
        opt.step()
        opt.zero_grad()
    return reports


def test_persisting_condition_is_one_alert_plus_reminders():
    model = _sigmoid_stack()
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=1, remind_every=20)
    reports = _train(monitor, model, 45)
    emitted = [(r.step, [a.kind for a in r.alerts]) for r in reports if r.alerts]
    assert emitted == [(2, ["vanishing"]), (22, ["vanishing"]), (42, ["vanishing"])]
    reminder = monitor.alerts[1]
    assert reminder.message.endswith("(still present: seen 19 more time(s) since step 2)")
    assert monitor.alerts[0].message.endswith("(threshold 1.00e-04).")


def test_warn_emits_gradwatch_warning_and_log_record(caplog):
    model = _sigmoid_stack()
    monitor = gw.GradWatch(model, sinks=[], on_alert="warn", log_every=1)
    with caplog.at_level(logging.WARNING, logger="gradwatch"), pytest.warns(gw.GradWatchWarning) as rec:
        _train(monitor, model, 3)
    alert = monitor.alerts[0]
    assert [str(w.message) for w in rec if issubclass(w.category, gw.GradWatchWarning)] == [alert.message]
    assert issubclass(gw.GradWatchWarning, UserWarning)
    assert [r.getMessage() for r in caplog.records if r.name == "gradwatch"] == [alert.message]


def test_raise_raises_after_the_step_is_recorded():
    model = _sigmoid_stack()
    monitor = gw.GradWatch(model, sinks=[], on_alert="raise", log_every=1)
    with pytest.raises(gw.GradWatchAlertError, match="^Vanishing gradients along depth at step 2") as exc:
        _train(monitor, model, 3)
    assert exc.value.alert is monitor.alerts[0]
    assert monitor.step_count == 3


def test_callable_receives_each_alert():
    model = _sigmoid_stack()
    seen: list[gw.Alert] = []
    monitor = gw.GradWatch(model, sinks=[], on_alert=seen.append, log_every=5)
    _train(monitor, model, 6)
    # Found at step 2 on the device, read back at logging step 5, reported with its own step.
    assert [(a.kind, a.step) for a in seen] == [("vanishing", 2)]
    assert seen == monitor.alerts


def test_alert_found_between_logging_steps_is_flushed_at_close():
    model = _sigmoid_stack()
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=100)
    _train(monitor, model, 4)
    assert monitor.alerts == []  # only step 0 was a logging step, before the 3-step persistence
    monitor.close()
    assert [(a.kind, a.step) for a in monitor.alerts] == [("vanishing", 2)]


def test_alerts_and_history_are_bounded():
    model = _sigmoid_stack()
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=1, remind_every=1, max_alerts=3,
                           history_size=4)
    _train(monitor, model, 12)
    assert len(monitor.alerts) == 3 and [a.step for a in monitor.alerts] == [9, 10, 11]
    assert [h["step"] for h in monitor.history] == [8.0, 9.0, 10.0, 11.0]
