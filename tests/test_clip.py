"""Clipping strategies against independent float64 implementations of their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _syncs import count_syncs
from torch import nn

import gradwatch as gw


class Net(nn.Module):
    """Conv weights (4-D), 1-D biases and norm gains, linear weights, a 3-D parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(32, 10)
        self.mix = nn.Module()
        self.mix.table = nn.Parameter(torch.randn(4, 6, 2))
        self.head = nn.Linear(10, 4)


def make(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def set_grads(model: nn.Module, gen: torch.Generator, scale: float = 1.0) -> None:
    """Random gradients whose size varies per unit, so some units/steps clip and others do not."""
    for p in model.parameters():
        unit = torch.exp(torch.randn(p.shape[0] if p.dim() else 1, generator=gen) * 1.5)
        shape = (-1,) + (1,) * (p.dim() - 1) if p.dim() else ()
        p.grad = torch.randn(p.shape, generator=gen) * 0.01 * scale * unit.reshape(shape)


def grads64(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().double().clone() for p in model.parameters()]


def run_step(model: nn.Module, clip: object) -> tuple[gw.GradWatch, gw.StepReport]:
    mon = gw.GradWatch(model, clip=clip, sinks=[], detectors=None, log_every=1)
    return mon, mon.step()


def assert_grads(model: nn.Module, expected: list[torch.Tensor], rtol: float = 1e-5) -> None:
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=rtol, atol=1e-12)


# ------------------------------------------------------------------------------ Norm / Value
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")], ids=["l2", "l1", "inf"])
@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["clips", "untouched"])
def test_norm_matches_clip_grad_norm(norm_type: float, max_norm: float) -> None:
    model, ref = make(), make()
    gen = torch.Generator().manual_seed(1)
    set_grads(model, gen)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    g64 = grads64(model)
    flat = torch.cat([g.reshape(-1) for g in g64])
    if math.isinf(norm_type):
        norm64 = float(flat.abs().max())
    else:
        norm64 = float((flat.abs() ** norm_type).sum() ** (1 / norm_type))
    expected = [g * min(1.0, max_norm / (norm64 + 1e-6)) for g in g64]  # the formula, in float64
    before = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type=norm_type)
    _, report = run_step(model, gw.clip.Norm(max_norm, norm_type=norm_type))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert_grads(model, expected)
    m = report.metrics
    assert m["clip/threshold"] == pytest.approx(max_norm)
    assert m["clip/coef"] == pytest.approx(min(1.0, max_norm / (before.item() + 1e-6)), rel=1e-6)
    if max_norm > 1:
        assert m["clip/coef"] == 1.0
    assert m["grad_norm_clipped/total"] <= m["grad_norm/total"] + 1e-9


def test_norm_keeps_preclip_grad_norm_metrics() -> None:
    model = make()
    set_grads(model, torch.Generator().manual_seed(2))
    pre = math.sqrt(sum(float((g**2).sum()) for g in grads64(model)))
    _, report = run_step(model, gw.clip.Norm(0.01))
    assert report.metrics["grad_norm/total"] == pytest.approx(pre, rel=1e-5)
    assert report.metrics["grad_norm_clipped/total"] == pytest.approx(0.01, rel=1e-4)
    post = math.sqrt(sum(float((g**2).sum()) for g in grads64(model)))
    assert post == pytest.approx(0.01, rel=1e-4)


def test_value_matches_clip_grad_value() -> None:
    model, ref = make(), make()
    set_grads(model, torch.Generator().manual_seed(3))
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    gmax = max(float(p.grad.abs().max()) for p in model.parameters())
    expected = [g.clamp(-0.01, 0.01) for g in grads64(model)]
    torch.nn.utils.clip_grad_value_(ref.parameters(), 0.01)
    _, report = run_step(model, gw.clip.Value(0.01))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert_grads(model, expected)
    assert max(float(p.grad.abs().max()) for p in model.parameters()) == pytest.approx(0.01)
    assert report.metrics["clip/threshold"] == pytest.approx(0.01)
    assert report.metrics["clip/coef"] == pytest.approx(0.01 / gmax, rel=1e-6)


# ------------------------------------------------------------------------------ AGC
def agc_reference(
    model: nn.Module, grads: list[torch.Tensor], clipping: float, eps: float, skip: set[str]
) -> tuple[list[torch.Tensor], float]:
    out, coefs = [], [1.0]
    for (name, p), g in zip(model.named_parameters(), grads):
        w = p.detach().double()
        if name in skip:
            out.append(g)
            continue
        if p.dim() >= 2:
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            gn = g.reshape(g.shape[0], -1).norm(dim=1)
        else:
            wn, gn = w.norm().reshape(1), g.norm().reshape(1)
        new = g.clone()
        for i in range(wn.numel()):
            max_norm = clipping * max(float(wn[i]), eps)
            if float(gn[i]) > max_norm:
                c = max_norm / float(gn[i])
                coefs.append(c)
                if p.dim() >= 2:
                    new[i] = g[i] * c
                else:
                    new = g * c
        out.append(new)
    return out, min(coefs)


@pytest.mark.parametrize(
    ("kwargs", "skip"),
    [
        ({}, set()),
        ({"exclude_1d": True}, {"conv.bias", "norm.weight", "norm.bias", "fc.bias", "head.bias"}),
        ({"exclude": ["head"]}, {"head.weight", "head.bias"}),
        ({"exclude": "mix", "clipping": 0.05, "eps": 0.5}, {"mix.table"}),
    ],
    ids=["all", "exclude_1d", "exclude_head", "exclude_prefix_big_eps"],
)
def test_agc_matches_reference(kwargs: dict, skip: set[str]) -> None:
    model = make()
    with torch.no_grad():
        model.norm.weight.mul_(torch.linspace(0.5, 2.0, 8))  # unequal norm gains
        model.fc.weight[0].zero_()  # a zero unit: the eps floor decides
    set_grads(model, torch.Generator().manual_seed(4), scale=10.0)
    clipping, eps = kwargs.get("clipping", 0.01), kwargs.get("eps", 1e-3)
    expected, coef = agc_reference(model, grads64(model), clipping, eps, skip)
    clipped_units = sum(1 for e, g in zip(expected, grads64(model)) if not torch.equal(e, g))
    assert clipped_units >= 3  # the test exercises clipping, not a no-op
    _, report = run_step(model, gw.clip.AGC(**kwargs))
    assert_grads(model, expected)
    assert report.metrics["clip/threshold"] == pytest.approx(clipping)
    assert report.metrics["clip/coef"] == pytest.approx(coef, rel=1e-5)


def test_agc_exclude_unknown_name() -> None:
    model = make()
    set_grads(model, torch.Generator().manual_seed(0))
    mon = gw.GradWatch(model, clip=gw.clip.AGC(exclude=["classifier"]), sinks=[], detectors=None)
    with pytest.raises(ValueError, match=r"`exclude` name 'classifier' matches no layer; the layers are: 'conv'"):
        mon.step()


# ------------------------------------------------------------------------------ ZScore / Percentile
def norms_sequence(n: int, seed: int) -> list[float]:
    """Multipliers for a healthy, drifting norm with a few spikes (x30) and a NaN step."""
    rng = np.random.default_rng(seed)
    m = list(np.exp(rng.normal(0, 0.3, n)) * np.linspace(1.0, 0.5, n))
    for k in (30, 31, 45, 52):
        m[k] *= 30.0
    return m


def zscore_reference(
    norms: list[float], alpha: float, z: float, warmup: int, max_norm: float = math.inf
) -> list[tuple[float, float]]:
    """ZClip, straight from the formulas (float64): (threshold, coef) per step."""
    out, seen, mean, var = [], [], 0.0, 0.0
    for g in norms:
        if not math.isfinite(g):
            out.append((max_norm if len(seen) < warmup else mean + z * math.sqrt(var), 1.0))
            continue
        if len(seen) < warmup:
            seen.append(g)  # the pre-clip norm
            out.append((max_norm, max_norm / (g + 1e-6) if g > max_norm else 1.0))
            if len(seen) == warmup:
                mean = float(np.mean(seen))
                var = float(np.var(seen))
            continue
        thr = mean + z * math.sqrt(var)
        x = min(g, thr)
        out.append((thr, thr / (g + 1e-6) if g > thr else 1.0))
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return out


def percentile_reference(norms: list[float], q: float, history: int) -> list[tuple[float, float]]:
    out, hist = [], []
    for g in norms:
        if math.isfinite(g):
            hist = (hist + [g])[-history:]
        thr = float(np.percentile(hist, q)) if hist else math.nan
        out.append((thr, min(1.0, thr / (g + 1e-6)) if math.isfinite(g) and hist else 1.0))
    return out


def drive(
    clip: object, mults: list[float], nan_at: int | None, start: int = 0
) -> tuple[list[float], list[tuple[float, float]]]:
    """Run the monitor over steps start.. of ``mults``; return pre-clip norms and (threshold, coef) per step."""
    model = make()
    mon = gw.GradWatch(model, clip=clip, sinks=[], detectors=None, log_every=1, on_nonfinite="warn")
    norms, got = [], []
    for k, mult in enumerate(mults[start:], start):
        set_grads(model, torch.Generator().manual_seed(1000 + k), scale=mult)
        if k == nan_at:
            model.fc.weight.grad[0, 0] = float("nan")
        g64 = grads64(model)
        norm = math.sqrt(sum(float((g**2).sum()) for g in g64))
        norms.append(norm)
        m = mon.step().metrics
        got.append((m["clip/threshold"], m["clip/coef"]))
        post = math.sqrt(sum(float((g**2).sum()) for g in grads64(model)))
        if math.isfinite(norm):
            assert post == pytest.approx(norm * m["clip/coef"], rel=1e-5)  # the coefficient is what was applied
    return norms, got


@pytest.mark.parametrize("max_norm", [None, 0.3], ids=["no_warmup_clip", "warmup_max_norm"])
def test_zscore_matches_reference(max_norm: float | None) -> None:
    mults = norms_sequence(80, seed=0)
    mults[4] *= 30.0  # a spike during warm-up
    norms, got = drive(gw.clip.ZScore(alpha=0.9, z_thresh=2.0, warmup=10, max_norm=max_norm), mults, nan_at=40)
    expected = zscore_reference(norms, 0.9, 2.0, 10, math.inf if max_norm is None else max_norm)
    assert [t for t, _ in got[:10]] == [math.inf if max_norm is None else pytest.approx(max_norm)] * 10
    assert (got[4][1] < 0.1) is (max_norm is not None)
    for k, ((t, c), (et, ec)) in enumerate(zip(got, expected)):
        if math.isfinite(et):
            assert t == pytest.approx(et, rel=1e-5), k
        assert c == pytest.approx(ec, rel=1e-5), k
    clipped = [k for k, (_, c) in enumerate(expected) if c < 1]
    assert {30, 31, 45, 52} <= set(clipped)  # the spikes are clipped
    assert len(clipped) < 20


def test_percentile_matches_reference() -> None:
    mults = norms_sequence(60, seed=1)
    norms, got = drive(gw.clip.Percentile(percentile=30.0, history=7), mults, nan_at=20)
    expected = percentile_reference(norms, 30.0, 7)
    for k, ((t, c), (et, ec)) in enumerate(zip(got, expected)):
        assert t == pytest.approx(et, rel=1e-5), k
        assert c == pytest.approx(ec, rel=1e-5), k
    assert sum(c < 1 for _, c in got) > 20  # ~70% of steps sit above the 30th percentile


def test_state_dict_round_trip_continues_identically() -> None:
    mults = norms_sequence(70, seed=2)
    for make_clip in (lambda: gw.clip.ZScore(warmup=5), lambda: gw.clip.Percentile(50.0, history=9)):
        _, full = drive(make_clip(), mults, nan_at=None)
        a = make_clip()
        drive(a, mults[:35], nan_at=None)
        state = a.state_dict()
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        b = make_clip()
        b.load_state_dict(state)
        assert all(torch.equal(state[k], v) for k, v in b.state_dict().items())
        _, rest = drive(b, mults, nan_at=None, start=35)
        assert rest == full[35:]  # same thresholds and coefficients, bit for bit: no re-warm-up
        assert any(c < 1 for _, c in rest)


def test_percentile_rejects_state_of_other_history() -> None:
    a = gw.clip.Percentile(history=5)
    drive(a, [1.0, 2.0], nan_at=None)
    with pytest.raises(ValueError, match=r"holds a history of \(5,\) norms but this Percentile keeps history=6"):
        gw.clip.Percentile(history=6).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------------ host syncs
CLIPPERS = {
    "norm": lambda: gw.clip.Norm(0.05),
    "norm_l1": lambda: gw.clip.Norm(0.05, norm_type=1.0),
    "value": lambda: gw.clip.Value(1e-3),
    "agc": lambda: gw.clip.AGC(exclude=["head"], exclude_1d=True),
    "zscore": lambda: gw.clip.ZScore(warmup=3),
    "percentile": lambda: gw.clip.Percentile(),
}


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_clippers_never_read_back_on_non_logging_steps(name: str) -> None:
    model = make()
    mon = gw.GradWatch(model, clip=CLIPPERS[name](), sinks=[], on_nonfinite="warn", log_every=4)
    per_step = []
    for k in range(9):
        set_grads(model, torch.Generator().manual_seed(k), scale=1.0 + 20.0 * (k == 6))
        with count_syncs() as calls:
            mon.step()
        per_step.append(calls)
    assert per_step == [["tolist"] if k % 4 == 0 else [] for k in range(9)]


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: gw.clip.Norm(0), "`max_norm` must be a finite number > 0; got 0"),
        (lambda: gw.clip.Norm(1.0, norm_type=-1), "`norm_type` must be a number > 0 or float('inf'); got -1"),
        (lambda: gw.clip.Value(float("nan")), "`clip_value` must be a finite number > 0; got nan"),
        (lambda: gw.clip.AGC(clipping=-0.1), "`clipping` must be a finite number > 0; got -0.1"),
        (lambda: gw.clip.AGC(eps=0), "`eps` must be a finite number > 0; got 0"),
        (lambda: gw.clip.AGC(exclude_1d="yes"), "`exclude_1d` must be True or False; got 'yes'"),
        (lambda: gw.clip.AGC(exclude=[3]), "`exclude` must be a layer name or a list of layer names; got [3]"),
        (lambda: gw.clip.ZScore(alpha=1.0), "`alpha` must be a number strictly between 0.0 and 1.0; got 1.0"),
        (lambda: gw.clip.ZScore(z_thresh=0), "`z_thresh` must be a finite number > 0; got 0"),
        (lambda: gw.clip.ZScore(warmup=1), "`warmup` must be an integer >= 2; got 1"),
        (lambda: gw.clip.ZScore(max_norm=0.0), "`max_norm` must be a finite number > 0; got 0.0"),
        (
            lambda: gw.clip.Percentile(percentile=100),
            "`percentile` must be a number strictly between 0.0 and 100.0; got 100",
        ),
        (lambda: gw.clip.Percentile(history=0), "`history` must be an integer >= 1; got 0"),
        (lambda: gw.clip.Percentile(history=2.5), "`history` must be an integer >= 1; got 2.5"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_arguments(factory, message: str) -> None:
    with pytest.raises(ValueError) as info:
        factory()
    assert str(info.value) == message


def test_clippers_are_clippers_and_have_readable_repr() -> None:
    clips = [
        gw.clip.AGC(0.02, exclude=["head"], exclude_1d=True),
        gw.clip.ZScore(),
        gw.clip.ZScore(max_norm=1.0),
        gw.clip.Percentile(),
    ]
    assert all(isinstance(c, gw.clip.Clipper) for c in clips)
    assert [repr(c) for c in clips] == [
        "AGC(clipping=0.02, eps=0.001, exclude_1d=True, exclude=['head'])",
        "ZScore(alpha=0.97, z_thresh=2.5, warmup=25)",
        "ZScore(alpha=0.97, z_thresh=2.5, warmup=25, max_norm=1)",
        "Percentile(percentile=10, history=1000)",
    ]
