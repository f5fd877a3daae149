"""max |g| has its own period (``grad_max_every``): the one logging-step statistic that reads every gradient again.

The records carry ``grad_max/<layer>`` on the first logging step at or after each multiple of
``grad_max_every`` and leave the key out elsewhere (never a stale value); ``param_norm`` and
``grad_to_param`` follow their own period (``param_norm_every``, tests/test_param_norm_every.py).
Values against a float64 reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradwatch as gw


def _train(steps: int, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", **kw)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    max_ref = []  # per step, per layer: max |g| in float64
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        max_ref.append({
            name: max(p.grad.detach().double().abs().max().item() for p in mod.parameters())
            for name, mod in (("0", model[0]), ("2", model[2]))
        })
        monitor.step()
        opt.step()
    monitor.close()
    return monitor, max_ref


@pytest.mark.parametrize(
    ("log_every", "grad_max_every", "steps", "with_max"),
    [
        (1, 3, 8, [0, 3, 6]),
        (2, 5, 17, [0, 6, 10, 16]),  # the first logging step at or after 5, 10, 15
        (3, 1, 9, [0, 3, 6]),  # 1: every logging step
        (4, 2, 12, [0, 4, 8]),  # a period shorter than log_every: every logging step
    ],
)
def test_grad_max_on_its_period_and_exact(log_every, grad_max_every, steps, with_max):
    monitor, ref = _train(steps, log_every=log_every, grad_max_every=grad_max_every, param_norm_every=1)
    history = list(monitor.history)
    assert [int(h["step"]) for h in history] == list(range(0, steps, log_every))
    assert [int(h["step"]) for h in history if "grad_max/0" in h] == with_max
    for h in history:
        s = int(h["step"])
        assert ("grad_max/2" in h) == (s in with_max)
        # Parameter norms (and the gradient-to-weight ratio) on every logging step with param_norm_every=1.
        assert h["param_norm/0"] > 0 and h["grad_to_param/2"] == pytest.approx(h["grad_norm/2"] / h["param_norm/2"])
        if s in with_max:
            for layer in ("0", "2"):
                assert h[f"grad_max/{layer}"] == pytest.approx(ref[s][layer], rel=1e-6)


def test_default_period_is_100_steps():
    monitor, _ = _train(230, log_every=10)
    assert [int(h["step"]) for h in monitor.history if "grad_max/0" in h] == [0, 100, 200]
    assert monitor.grad_max_every == 100


def test_value_clipping_keeps_grad_max_on_every_logging_step():
    # clip/coef of Value clipping is min(1, clip_value / max|g|): it needs max |g| where it is reported.
    monitor, _ = _train(6, log_every=1, clip=gw.clip.Value(10.0))
    assert [int(h["step"]) for h in monitor.history if "grad_max/0" in h] == list(range(6))
    assert all(h["clip/coef"] == 1.0 for h in monitor.history)


def test_resumed_monitor_computes_grad_max_at_its_first_logging_step(tmp_path):
    first, _ = _train(7, log_every=1, grad_max_every=100)
    state = first.state_dict()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    path = tmp_path / "run.jsonl"
    resumed = gw.GradWatch(model, sinks=[gw.sinks.JSONL(path)], on_alert="ignore", log_every=1, grad_max_every=100)
    resumed.load_state_dict(state)
    x = torch.randn(16, 4)
    for _ in range(2):
        model.zero_grad()
        model(x).sum().backward()
        resumed.step()
    resumed.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    meta = next(r for r in records if r["type"] == "meta")
    assert meta["grad_max_every"] == 100
    metrics = [r for r in records if r["type"] == "metrics"]
    assert [(r["step"], "grad_max/0" in r["metrics"]) for r in metrics] == [(7, True), (8, False)]
