"""Checkpoint and resume: a resumed run neither re-warms nor re-alerts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw

TOTAL, STOP = 100, 50  # the run stops after step 50 and resumes at 51
NAN_AT = {30, 75}  # the second NaN is a repeat of a known condition: suppressed, also after resuming
SPIKE_AT = 60  # within 20 steps of a fresh start the spike detector would still be warming up


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + k)
    return torch.randn(16, 8, generator=gen), torch.randn(16, 2, generator=gen)


def build(clip_kind: str) -> tuple[nn.Module, torch.optim.Optimizer, gw.GradWatch]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    clip = {"zscore": gw.clip.ZScore(warmup=25), "percentile": gw.clip.Percentile(25.0, history=40)}[clip_kind]
    mon = gw.GradWatch(model, clip=clip, sinks=[], log_every=5, on_alert="ignore")
    return model, opt, mon


def train(model: nn.Module, opt: torch.optim.Optimizer, mon: gw.GradWatch, steps: range) -> None:
    for k in steps:
        x, y = batch(k)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        if k in NAN_AT:
            loss = loss * float("nan")
        if k == SPIKE_AT:
            loss = loss * 1e4
        loss.backward()
        assert mon.step().step == k
        opt.step()


def after(mon: gw.GradWatch, key: str) -> list[tuple[float, float | str | None]]:
    """(step, value) of the logging steps after the stop; NaN as "nan" so that lists compare equal."""
    out = [(h["step"], h.get(key)) for h in mon.history if h["step"] > STOP]
    return [(s, "nan" if isinstance(v, float) and math.isnan(v) else v) for s, v in out]


@pytest.mark.parametrize("clip_kind", ["zscore", "percentile"])
def test_resumed_run_matches_uninterrupted(clip_kind: str, tmp_path: Path) -> None:
    model, opt, full = build(clip_kind)
    train(model, opt, full, range(TOTAL))

    model, opt, first = build(clip_kind)
    train(model, opt, first, range(STOP + 1))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradwatch": first.state_dict()}, ckpt)
    first.close()

    state = torch.load(ckpt)  # weights_only=True: the monitor's state is plain containers and tensors
    model, opt, resumed = build(clip_kind)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    resumed.load_state_dict(state["gradwatch"])
    assert resumed.step_count == STOP + 1
    train(model, opt, resumed, range(STOP + 1, TOTAL))

    for key in ("clip/threshold", "clip/coef", "grad_norm/total", "skipped_steps"):
        assert after(resumed, key) == after(full, key), key
    assert [r for r in after(full, "clip/threshold") if isinstance(r[1], str) or r[1] == math.inf] == []
    new = [a for a in full.alerts if a.step > STOP]
    assert [(a.kind, a.step) for a in new] == [("spike", SPIKE_AT)]  # the NaN at 75 repeats a known condition
    assert [a for a in resumed.alerts if a.step > STOP] == new
    assert resumed.alerts == full.alerts  # the alert log came back too
    assert resumed.skipped_steps == full.skipped_steps == 2

    # Without the monitor's state the same resumed run would re-warm and re-alert: the test has teeth.
    model, opt, fresh = build(clip_kind)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    fresh._step = STOP + 1
    train(model, opt, fresh, range(STOP + 1, TOTAL))
    assert after(fresh, "clip/threshold") != after(full, "clip/threshold")
    assert [(a.kind, a.step) for a in fresh.alerts] != [(a.kind, a.step) for a in new]


def test_state_dict_before_the_first_step_round_trips() -> None:
    _, _, a = build("zscore")
    state = a.state_dict()
    assert state["step"] == 0 and state["detectors"] is None and state["clip"] == {}
    _, _, b = build("zscore")
    b.load_state_dict(state)
    assert b.step_count == 0


def test_amp_overflow_run_across_a_checkpoint(tmp_path: Path) -> None:
    """10 overflow skips before the checkpoint and 6 after make one run of 16: one alert, as uninterrupted."""
    overflow = set(range(40, 56))

    def amp_build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu")
        return model, opt, scaler, gw.GradWatch(model, sinks=[], log_every=5, on_alert="ignore", scaler=scaler)

    def amp_train(model, opt, scaler, mon, steps):
        for k in steps:
            x, y = batch(k)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.mse_loss(model(x[:, :8]).float(), y)
            if k in overflow:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            mon.step()
            scaler.step(opt)
            scaler.update()

    full = amp_build()
    amp_train(*full, range(70))
    first = amp_build()
    amp_train(*first, range(50))
    ckpt = tmp_path / "amp.pt"
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "scaler": first[2].state_dict(),
                "gradwatch": first[3].state_dict()}, ckpt)
    state = torch.load(ckpt)
    model, opt, scaler, mon = amp_build()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    scaler.load_state_dict(state["scaler"])
    mon.load_state_dict(state["gradwatch"])
    amp_train(model, opt, scaler, mon, range(50, 70))
    assert [(a.kind, a.step, a.value) for a in full[3].alerts] == [("nonfinite", 55, 16.0)]
    assert mon.alerts == full[3].alerts
    assert mon.history[-1]["amp/overflow_steps"] == full[3].history[-1]["amp/overflow_steps"] == 16.0
