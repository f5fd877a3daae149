"""Weight norms have their own period (``param_norm_every``), and are read early when the gradients move fast.

The records carry ``param_norm/<layer>`` and ``grad_to_param/<layer>`` on the first logging step at or
after each multiple of ``param_norm_every`` and leave the keys out elsewhere (never a stale value).
A total gradient norm more than ``WEIGHT_REREAD_FACTOR`` times (or less than its inverse) the one at the
last weight read, or a non-finite one, has the weights read at the next logging step. Values against a
float64 reference; the ATen ops a weight read costs are counted.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch as gw
from gradwatch.monitor import WEIGHT_REREAD_FACTOR


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(steps: int, *, loss_scale: dict[int, float] | None = None, lr: float = 1e-4, model=None, **kw):
    """Train ``steps`` steps; the loss of step ``s`` is multiplied by ``loss_scale[s]`` (gradients scale with it)."""
    model = model if model is not None else _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kw.setdefault("sinks", [])
    monitor = gw.GradWatch(model, on_alert="ignore", **kw)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    ref = []  # per step, per layer: the weight norm in float64 when the gradients were taken
    for s in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * (loss_scale or {}).get(s, 1.0)
        loss.backward()
        ref.append({
            name: sum(p.detach().double().square().sum() for p in mod.parameters()).sqrt().item()
            for name, mod in (("0", model[0]), ("2", model[2]))
        })
        monitor.step()
        opt.step()
    monitor.close()
    return monitor, ref


def _read_steps(monitor) -> list[int]:
    return [int(h["step"]) for h in monitor.history if "param_norm/0" in h]


@pytest.mark.parametrize(
    ("log_every", "param_norm_every", "steps", "with_norms"),
    [
        (1, 4, 11, [0, 4, 8]),
        (2, 5, 17, [0, 6, 10, 16]),  # the first logging step at or after 5, 10, 15
        (3, 1, 9, [0, 3, 6]),  # 1: every logging step
        (4, 2, 12, [0, 4, 8]),  # a period shorter than log_every: every logging step
    ],
)
def test_weight_norms_on_their_period_and_exact(log_every, param_norm_every, steps, with_norms):
    monitor, ref = _train(steps, log_every=log_every, param_norm_every=param_norm_every)
    history = list(monitor.history)
    assert [int(h["step"]) for h in history] == list(range(0, steps, log_every))
    assert _read_steps(monitor) == with_norms
    for h in history:
        s = int(h["step"])
        assert "grad_norm/0" in h and "grad_norm/total" in h  # the gradient figures are on every logging step
        for layer in ("0", "2"):
            assert (f"param_norm/{layer}" in h) == (s in with_norms)
            assert (f"grad_to_param/{layer}" in h) == (s in with_norms)
            if s in with_norms:
                assert h[f"param_norm/{layer}"] == pytest.approx(ref[s][layer], rel=1e-6)
                assert h[f"grad_to_param/{layer}"] == pytest.approx(h[f"grad_norm/{layer}"] / ref[s][layer], rel=1e-6)


def test_default_period_is_10_steps():
    monitor, _ = _train(31, log_every=1)
    assert monitor.param_norm_every == 10
    assert _read_steps(monitor) == [0, 10, 20, 30]
    # At the default log_every=10, every logging step reads the weights (as before the option existed).
    monitor, _ = _train(31)
    assert _read_steps(monitor) == [0, 10, 20, 30] == [int(h["step"]) for h in monitor.history]


@pytest.mark.parametrize(
    ("scale", "reread"),
    [
        (WEIGHT_REREAD_FACTOR * 1.5, True),  # gradients 3x: the next logging step reads the weights
        (1 / (WEIGHT_REREAD_FACTOR * 1.5), True),  # a third: read too
        (1.5, False),  # within the factor: the period holds
        (float("inf"), True),  # non-finite gradients at step 3 only (the step is skipped): read
    ],
)
def test_fast_moving_gradients_have_the_weights_read_at_the_next_logging_step(scale, reread):
    # Steps 3.. have their loss scaled: the total gradient norm moves by ``scale`` from step 3 on.
    steps = [3] if scale == float("inf") else range(3, 16)
    monitor, ref = _train(16, log_every=1, loss_scale=dict.fromkeys(steps, scale))
    totals = [h["grad_norm/total"] for h in monitor.history]
    if scale != float("inf"):
        assert totals[3] / totals[0] == pytest.approx(scale, rel=0.01)
    assert _read_steps(monitor) == ([0, 4, 10] if reread else [0, 10])
    if reread:
        h = monitor.history[4]
        assert h["param_norm/2"] == pytest.approx(ref[4]["2"], rel=1e-6)


def test_meta_and_repr_carry_the_period(tmp_path):
    path = tmp_path / "run.jsonl"
    monitor, _ = _train(2, log_every=1, param_norm_every=7, sinks=[gw.sinks.JSONL(path)])
    meta = next(r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "meta")
    assert meta["param_norm_every"] == 7
    assert "param_norm_every=7" in repr(monitor)


def _steps(model, opt, monitor, x, y, steps: range) -> None:
    for s in steps:
        opt.zero_grad()
        # Gradients shrink 3x at step 4: the early re-read falls at step 5, before the checkpoint.
        (nn.functional.mse_loss(model(x), y) * (1 / 3 if s >= 4 else 1.0)).backward()
        monitor.step()
        opt.step()


def _update_steps(monitor) -> list[int]:
    return [int(h["step"]) for h in monitor.history if "update_ratio/0" in h]


def test_a_resumed_run_reads_and_samples_the_weights_where_the_uninterrupted_one_does(tmp_path):
    # The checkpoint is taken right after a weight read (step 5): its update-ratio sample waits for the
    # measure at step 6, and travels in the checkpoint. The resumed monitor reads the weight norms at its
    # first logging step too (the detectors hold none), outside the schedule.
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    full_model = _model()
    full_opt = torch.optim.SGD(full_model.parameters(), lr=0.05)
    full = gw.GradWatch(full_model, sinks=[], on_alert="ignore", log_every=1)
    _steps(full_model, full_opt, full, x, y, range(12))

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=1)
    _steps(model, opt, first, x, y, range(6))
    torch.save({"monitor": first.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    first.close()

    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    model = _model()
    model.load_state_dict(ckpt["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.load_state_dict(ckpt["opt"])
    resumed = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=1)
    resumed.load_state_dict(ckpt["monitor"])
    _steps(model, opt, resumed, x, y, range(6, 12))
    full.close()
    resumed.close()

    assert _read_steps(full) == [0, 5, 10]  # the schedule, and the re-read after the 3x drop at step 4
    assert [s for s in _read_steps(resumed) if s >= 6] == [6, 10]
    assert [s for s in _update_steps(full) if s >= 6] == [s for s in _update_steps(resumed) if s >= 6] == [6, 11]
    after = {int(h["step"]): h for h in full.history}
    for h in resumed.history:
        if h["step"] >= 6 and "update_ratio/0" in h:
            assert h["update_ratio/0"] == pytest.approx(after[int(h["step"])]["update_ratio/0"], rel=1e-5)
    _assert_same_state(full.state_dict()["detectors"], resumed.state_dict()["detectors"])


def _assert_same_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_a_logging_step_without_the_weight_read_dispatches_fewer_ops():
    # 5 Linear layers, log_every=1, param_norm_every=3: steps 0, 3, 6 read the weights (norms, and the
    # update-ratio sample the step after measures: steps 1, 4); steps 2 and 5 read no weight at all.
    # Each weight read is one foreach pass per (device, dtype) group plus a few fixed ops, whatever the depth.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=1, param_norm_every=3)
    x = torch.randn(4, 8)
    counts = []
    for _ in range(7):
        model.zero_grad()
        model(x).square().mean().backward()
        with _Ops() as ops:
            monitor.step()
        counts.append(ops.n)
    monitor.close()
    assert _read_steps(monitor) == [0, 3, 6]
    read, measure, neither = counts[3], counts[4], counts[5]
    assert counts[6] == read and counts[1] == measure and counts[2] == neither
    assert 0 < read - neither <= 20 and 0 < measure - neither <= 20
