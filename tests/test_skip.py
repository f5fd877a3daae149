"""Skipping a poisoned step: a NaN never reaches the weights or the optimizer state."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw

STEPS = 12
K = 5  # the poisoned step


def model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]
    return model, data


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_state(a: dict, b: dict) -> bool:
    """Deep equality of optimizer state dicts, tensors compared bit for bit."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not isinstance(y, dict) or not same_state(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def train(mode: str, nan_at: int | None, tmp: Path, drop: int | None = None, **kw):
    """Adam training; returns per-step (params before, params after, state before, state after), monitor."""
    model, data = model_and_data()
    if drop is not None:
        data = data[:drop] + data[drop + 1 :]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sinks = [gw.sinks.JSONL(tmp / f"{mode}.jsonl")]
    opts = {"sinks": sinks, "log_every": 1, "on_alert": "ignore", **kw}
    if mode == "explicit":
        mon = gw.GradWatch(model, **opts)
    elif mode == "watch":
        mon = gw.watch(model, opt, **opts)
    else:  # watch without an optimizer: the global optimizer pre-hook
        mon = gw.watch(model, **opts)
    trace, reports = [], []
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        if k == nan_at:
            loss = loss * float("nan")
        loss.backward()
        before = (params(model), copy.deepcopy(opt.state_dict()))
        if mode == "explicit":
            reports.append(mon.step())
        opt.step()
        trace.append((*before, params(model), copy.deepcopy(opt.state_dict())))
    mon.close()
    return trace, mon, reports, model


@pytest.mark.parametrize("mode", ["explicit", "watch", "watch_all"])
def test_nan_step_is_skipped_bit_identically(mode: str, tmp_path: Path) -> None:
    trace, mon, reports, model = train(mode, K, tmp_path)
    p_before, s_before, p_after, s_after = trace[K]
    assert all(torch.equal(a, b) for a, b in zip(p_before, p_after))
    assert same_state(s_before["state"], s_after["state"]) and s_before["param_groups"] == s_after["param_groups"]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # Step K+1 updates normally: exactly as a run that never saw batch K.
    p1_before, _, p1_after, s1_after = trace[K + 1]
    assert not any(torch.equal(a, b) for a, b in zip(p1_before, p1_after))
    ref, _, _, _ = train(mode, None, tmp_path / "ref", drop=K)
    _, _, ref_after, ref_state = ref[K]  # the reference's step K used batch K+1
    assert all(torch.equal(a, b) for a, b in zip(p1_after, ref_after))
    assert same_state(s1_after["state"], ref_state["state"])
    for k in range(K + 2, STEPS):
        assert all(torch.equal(a, b) for a, b in zip(trace[k][2], ref[k - 1][2]))

    # Exactly one alert, non-finite, naming step K and the layers in backward order.
    assert [(a.kind, a.step, a.layer, a.severity) for a in mon.alerts] == [("nonfinite", K, "4", "error")]
    assert mon.alerts[0].message == (
        f"Non-finite gradients (NaN/Inf) at step {K} in 3 layer(s), first in backward order: 4, 2, 0. "
        "The step was skipped: no weight or optimizer state changed."
    )
    assert mon.skipped_steps == 1
    records = [json.loads(line) for line in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
    alerts = [r for r in records if r["type"] == "alert"]
    assert [(r["kind"], r["step"]) for r in alerts] == [("nonfinite", K)]
    metrics = [r for r in records if r["type"] == "metrics"]
    assert [r["step"] for r in metrics] == list(range(STEPS))
    assert [r["metrics"]["skipped_steps"] for r in metrics] == [0.0] * K + [1.0] * (STEPS - K)
    assert metrics[K]["metrics"]["nonfinite/total"] == float(sum(p.numel() for p in model.parameters()))
    if mode == "explicit":
        assert [r.skipped for r in reports] == [k == K for k in range(STEPS)]
        assert [a.kind for a in reports[K].alerts] == ["nonfinite"]


def poison_middle(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward where the gradient reaching layer '2''s output is NaN: layers 2 and 0 get NaN, 4 does not."""
    h = model[1](model[0](x))
    h = model[2](h)
    h.register_hook(lambda g: g * float("nan"))
    return model[4](model[3](h))


def test_raise_names_the_layers_in_backward_order() -> None:
    model, data = model_and_data()
    mon = gw.GradWatch(model, on_nonfinite="raise", sinks=[], on_alert="ignore")
    x, y = data[0]
    F.mse_loss(model(x), y).backward()
    mon.step()
    model.zero_grad()
    F.mse_loss(poison_middle(model, x), y).backward()
    with pytest.raises(gw.NonFiniteGradientError) as info:
        mon.step()
    err = info.value
    assert (err.step, err.layers) == (1, ["2", "0"])
    assert str(err) == (
        "Non-finite gradients at step 1 in 2 layer(s): 2, 0. "
        "To skip such steps instead of raising, set `on_nonfinite='skip'`."
    )
    assert mon.step_count == 2  # a raised step still counts
    assert torch.isnan(model[2].weight.grad).all()  # nothing was changed behind the user's back


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_warn_and_ignore_pass_the_gradients_on(policy: str) -> None:
    model, data = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = gw.GradWatch(model, on_nonfinite=policy, sinks=[], on_alert="ignore", log_every=1)
    x, y = data[0]
    F.mse_loss(poison_middle(model, x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    report = mon.step()
    assert not report.skipped and mon.skipped_steps == 0
    for p, e in zip(model.parameters(), expected):
        assert p.grad is not None and torch.equal(p.grad.nan_to_num(7.0), e.nan_to_num(7.0))
    assert report.metrics["skipped_steps"] == 0.0
    assert report.metrics["nonfinite/total"] == float(model[2].weight.numel() + model[2].bias.numel() + 16 * 6 + 16)
    assert [(a.kind, a.layer) for a in report.alerts] == [("nonfinite", "2")]
    assert "skipped" not in report.alerts[0].message
    opt.step()
    assert torch.isnan(model[0].weight).all() and torch.isfinite(model[4].weight).all()


def test_skip_with_a_clipper_leaves_clip_state_untouched(tmp_path: Path) -> None:
    clip = gw.clip.ZScore(warmup=3)
    trace, mon, _, _ = train("explicit", K, tmp_path, clip=clip)
    assert mon.skipped_steps == 1
    # The NaN step did not enter the clipper's EMA: all its state is finite.
    assert all(torch.isfinite(v).all() for v in clip.state_dict().values())
    assert clip.state_dict()["count"].item() == STEPS - 1
