"""AMP: statistics and clipping see unscaled gradients; overflow skips are the scaler's job."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.amp import overflow_run_limit

MODES = ["attach", "unscale_then_step", "step_scaled"]


def setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(40)]
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), data


def layer_norms(model: nn.Module) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, mod in model.named_children():
        ps = [p for p in mod.parameters(recurse=False) if p.grad is not None]
        if ps:
            out[name] = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ps))
    out["total"] = math.sqrt(sum(v**2 for v in out.values()))
    return out


def run(
    mode: str,
    *,
    steps: int,
    pass_scaler: bool = True,
    inject: set[int] = frozenset(),
    clip: object = None,
    growth_interval: int = 2000,
    on_alert: str = "ignore",
):
    """bf16 autocast + GradScaler("cpu") training; returns (monitor, unscaled norms per iteration, scaler, model)."""
    model, opt, data = setup()
    scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    kw = {"sinks": [], "log_every": 1, "grad_max_every": 1, "param_norm_every": 1, "on_alert": on_alert, "clip": clip,
          "scaler": scaler if pass_scaler else None}
    mon = gw.watch(model, opt, **kw) if mode == "attach" else gw.GradWatch(model, **kw)
    true = []
    for k in range(steps):
        x, y = data[k % len(data)]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = F.mse_loss(out.float(), y)
        if k in inject:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if mode == "unscale_then_step":
            scaler.unscale_(opt)
            mon.step()
        elif mode == "step_scaled":
            mon.step()
        scaler.step(opt)  # unscales in place (if not done yet): p.grad now holds the true gradients
        true.append(layer_norms(model))
        scaler.update()
    return mon, true, scaler, model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pass_scaler", [True, False], ids=["scaler", "no_scaler"])
def test_logged_norms_are_the_unscaled_norms(mode: str, pass_scaler: bool) -> None:
    mon, true, scaler, _ = run(mode, steps=6, pass_scaler=pass_scaler)
    assert len(mon.history) == 6
    ratio = 1.0 if pass_scaler or mode != "step_scaled" else 65536.0
    for rec, ref in zip(mon.history, true):
        for name, v in ref.items():
            assert rec[f"grad_norm/{name}"] == pytest.approx(v * ratio, rel=1e-3), (rec["step"], name)
    if not pass_scaler and mode == "step_scaled":
        return  # without the scaler gradwatch cannot know the gradients are scaled: 65536x too large
    # max |g| is unscaled too.
    assert mon.history[-1]["grad_max/5"] < 10.0
    if pass_scaler:
        assert [r["amp/scale"] for r in mon.history] == [65536.0] * 6
        assert [r["amp/overflow_steps"] for r in mon.history] == [0.0] * 6
    assert mon.alerts == []


@pytest.mark.parametrize(
    "make_clip",
    [
        lambda: gw.clip.Norm(0.05),
        lambda: gw.clip.Value(1e-3),
        lambda: gw.clip.AGC(0.01),
        lambda: gw.clip.ZScore(warmup=3),
        lambda: gw.clip.Percentile(50.0),
    ],
    ids=["norm", "value", "agc", "zscore", "percentile"],
)
def test_clipping_scaled_gradients_equals_clipping_unscaled_ones(make_clip) -> None:
    a, true_a, _, model_a = run("step_scaled", steps=8, clip=make_clip())
    b, true_b, _, model_b = run("unscale_then_step", steps=8, clip=make_clip())
    for ra, rb in zip(a.history, b.history):
        assert ra["clip/threshold"] == pytest.approx(rb["clip/threshold"], rel=1e-5)
        assert ra["clip/coef"] == pytest.approx(rb["clip/coef"], rel=1e-5)
        assert ra["grad_norm_clipped/total"] == pytest.approx(rb["grad_norm_clipped/total"], rel=1e-5)
    for ta, tb in zip(true_a, true_b):  # the gradients the optimizer applied (post-clip, unscaled)
        assert ta["total"] == pytest.approx(tb["total"], rel=1e-5)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    clipped = [r for r in a.history if r["clip/coef"] < 1]
    assert clipped, "the clipper must act in this test"
    if isinstance(a.clip, gw.clip.Norm):
        assert [t["total"] for t in true_a] == pytest.approx([0.05] * 8, rel=1e-4)


@pytest.mark.parametrize("mode", ["unscale_then_step", "step_scaled"])
def test_overflow_step_is_the_scalers_job(mode: str) -> None:
    model, _, _ = setup()
    mon, true, scaler, model = run(mode, steps=8, inject={3})
    assert mon.alerts == []
    assert mon.skipped_steps == 0
    h = mon.history
    assert [r["step"] for r in h] == list(range(8))
    assert [r["amp/overflow_steps"] for r in h] == [0.0] * 3 + [1.0] * 5
    assert [r["amp/scale"] for r in h] == [65536.0] * 4 + [32768.0] * 4
    assert h[3]["nonfinite/total"] > 0 and h[3]["skipped_steps"] == 0.0
    assert scaler.get_scale() == 32768.0


def test_without_scaler_an_overflow_is_a_nonfinite_alert() -> None:
    mon, _, _, _ = run("unscale_then_step", steps=6, inject={3}, pass_scaler=False)
    assert [(a.kind, a.step) for a in mon.alerts] == [("nonfinite", 3)]
    assert mon.skipped_steps == 1


LIMIT = overflow_run_limit(0.5)


def test_run_limit_follows_the_backoff_factor() -> None:
    assert (LIMIT, overflow_run_limit(0.25), overflow_run_limit(0.9)) == (16, 8, 106)


@pytest.mark.parametrize("length", [LIMIT - 1, LIMIT], ids=["short", "long"])
@pytest.mark.parametrize("mode", MODES)
def test_long_overflow_run_is_one_alert(mode: str, length: int) -> None:
    start = 3
    mon, _, scaler, _ = run(mode, steps=start + length + 3, inject=set(range(start, start + length)))
    if mode == "attach":
        # Skipped optimizer steps run no pre-hook: the monitor's next step (3) sees how far the scale fell.
        expected_step, final_steps = start, 6
    else:
        expected_step, final_steps = start + LIMIT - 1, start + length + 3
    assert mon.step_count == final_steps
    assert mon.history[-1]["amp/overflow_steps"] == float(length)
    if length < LIMIT:
        assert mon.alerts == []
        return
    assert [(a.kind, a.step, a.layer, a.value, a.threshold, a.severity) for a in mon.alerts] == [
        ("nonfinite", expected_step, None, 16.0, 16.0, "error")
    ]
    assert mon.alerts[0].message == (
        f"The GradScaler skipped 16 consecutive optimizer steps for inf/NaN gradients (up to step {expected_step}): "
        "its scale fell 0.5^16-fold, far beyond calibration, so the gradients are non-finite at any scale and "
        "training is not progressing."
    )


def test_attach_run_still_going_at_close_is_reported() -> None:
    mon, _, scaler, _ = run("attach", steps=25, inject=set(range(5, 25)))
    assert mon.alerts == []
    mon.close()
    assert [(a.kind, a.step, a.value) for a in mon.alerts] == [("nonfinite", 5, 20.0)]


@pytest.mark.parametrize("mode", MODES)
def test_overflow_count_survives_scale_growth(mode: str) -> None:
    # growth_interval=2: the scale doubles after every 2 clean steps, so growth and backoff interleave.
    inject = {4, 7, 8, 11, 14, 15, 16, 21}
    mon, _, scaler, _ = run(mode, steps=26, inject=inject, growth_interval=2)
    assert mon.history[-1]["amp/overflow_steps"] == float(len(inject))
    assert mon.alerts == []


def test_scaler_argument_is_checked() -> None:
    model, _, _ = setup()
    with pytest.raises(ValueError) as info:
        gw.GradWatch(model, scaler=2.0)
    assert str(info.value) == "`scaler` must be None or a torch.amp.GradScaler (the one your loop uses); got float"


def test_disabled_scaler_changes_nothing() -> None:
    model, opt, data = setup()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    mon = gw.GradWatch(model, sinks=[], log_every=1, scaler=scaler, on_alert="ignore")
    x, y = data[0]
    F.mse_loss(model(x), y).backward()
    m = mon.step().metrics
    assert m["grad_norm/total"] == pytest.approx(layer_norms(model)["total"], rel=1e-6)
    assert math.isnan(m["amp/scale"]) and m["amp/overflow_steps"] == 0.0


@pytest.mark.parametrize("pass_scaler", [True, False], ids=["scaler", "no_scaler"])
def test_fused_optimizer_sees_scaled_gradients_in_its_pre_hook(pass_scaler: bool) -> None:
    # Optimizers with built-in AMP support (fused Adam) get still-scaled gradients from scaler.step:
    # the pre-hook runs at stage READY, so with scaler= gradwatch divides by the scale itself.
    model, _, data = setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu")
    mon = gw.watch(model, opt, sinks=[], log_every=1, on_alert="ignore", scaler=scaler if pass_scaler else None)
    true = []
    for k in range(6):
        x, y = data[k]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        if k == 3 and pass_scaler:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)  # the fused kernel unscales p.grad in place
        true.append(layer_norms(model))
        scaler.update()
    ratio = 1.0 if pass_scaler else 65536.0
    for k, (rec, ref) in enumerate(zip(mon.history, true)):
        if k == 3 and pass_scaler:
            assert math.isnan(rec["grad_norm/total"])  # the overflow step, seen and left to the scaler
            continue
        assert rec["grad_norm/total"] == pytest.approx(ref["total"] * ratio, rel=1e-3), k
    if pass_scaler:
        assert [r["amp/overflow_steps"] for r in mon.history] == [0.0] * 3 + [1.0] * 3
        assert mon.alerts == []
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_no_readback_on_non_logging_steps_with_a_scaler(mode: str) -> None:
    # With scaler=, inf/NaN belong to the scaler, so even the default on_nonfinite="skip" needs no
    # host sync: non-logging steps read nothing back, logging steps one stacked transfer.
    from _syncs import count_syncs

    model, _, data = setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # Adam's own step reads its step counts back
    scaler = torch.amp.GradScaler("cpu")
    kw = {"sinks": [], "log_every": 4, "on_alert": "ignore", "scaler": scaler, "clip": gw.clip.ZScore(warmup=2)}
    mon = gw.watch(model, opt, **kw) if mode == "attach" else gw.GradWatch(model, **kw)
    per_step = []
    for k in range(9):
        x, y = data[k]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if mode == "unscale_then_step":
            scaler.unscale_(opt)
        if mode == "attach":
            scaler.unscale_(opt)  # GradScaler's own step reads found_inf back (.item()): keep it out of the count
        with count_syncs() as calls:
            if mode == "attach":
                opt.step()  # runs the monitor in the pre-hook
            else:
                mon.step()
        per_step.append(calls)
        if mode != "attach":
            scaler.step(opt)
        scaler.update()
    assert per_step == [["tolist"] if k % 4 == 0 else [] for k in range(9)]
