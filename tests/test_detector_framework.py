"""The detector framework on its own: DeviceState, Latch, Persistence, the EMAs, and detectors driven
step by step with hand-built evidence (no monitor), against plain-Python float64 references."""

from __future__ import annotations

import math
import random
from array import array

import pytest
import torch

from gradwatch.detectors import (
    ActivationStats,
    Detector,
    DetectorContext,
    DeviceState,
    Exploding,
    Finding,
    GradStats,
    Latch,
    NonFinite,
    Oscillation,
    Persistence,
    SmallUpdates,
    Spike,
    StepEvidence,
    TimeVanishing,
    Vanishing,
)
from gradwatch.detectors._common import HostPersistence, HostRow
from gradwatch.detectors.base import Series
from gradwatch.detectors.depth import _LayerFigures
from gradwatch.layers import Layer
from gradwatch.temporal import TimeProfile

CPU = torch.device("cpu")


def ctx_for(n: int = 4) -> DetectorContext:
    layers = [Layer(f"l{i}", f"l{i}", (), True) for i in range(n)]
    return DetectorContext(
        layers=layers, device=CPU, numel=torch.full((n,), 100.0), weight_layers=list(range(n)), time_layers=["rnn"]
    )


def stats_of(grad_norm: list[float], param_norm: list[float] | None = None) -> GradStats:
    g = torch.tensor(grad_norm, dtype=torch.float32)
    sq = g * g
    total = sq.sum()
    return GradStats(
        step=0,
        present=torch.ones(len(grad_norm), dtype=torch.bool),
        present_host=(True,) * len(grad_norm),
        grad_sq=sq,
        grad_norm=g,
        total_norm=total.sqrt(),
        nonfinite=~torch.isfinite(sq),
        any_nonfinite=~torch.isfinite(total),
        param_norm=None if param_norm is None else torch.tensor(param_norm),
        grad_max=None if param_norm is None else g,
    )


def evidence(step: int, stats: GradStats, **kw) -> StepEvidence:
    stats.step = step
    return StepEvidence(stats=stats, step=torch.tensor(float(step)), **kw)


def read(d: Detector | object) -> dict[str, list[float]]:
    """What the monitor does at a logging step: one host read of the named readout."""
    return {k: v.reshape(-1).tolist() for k, v in d.readout().items()}  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------ DeviceState
def test_device_state_allocates_checkpoints_resets_and_moves() -> None:
    st = DeviceState()
    st.add_state("ema.mean", lambda dev: torch.zeros(3, device=dev))
    st.add_state("count", lambda dev: torch.zeros((), device=dev))
    st.add_state("scratch", lambda dev: torch.ones(2, device=dev), persistent=False, readout=True)
    assert not st.bound and st.state_dict() == {}
    with pytest.raises(RuntimeError, match="not allocated yet"):
        _ = st.count
    st.bind("cpu")
    assert st.bound and st.names == ["ema.mean", "count", "scratch"]
    st.count = st.count + 5
    st["ema.mean"] = torch.tensor([1.0, 2.0, 3.0])
    sd = st.state_dict()
    assert set(sd) == {"ema", "count"} and set(sd["ema"]) == {"mean"}  # nested by dotted name, scratch left out
    assert sd["count"].item() == 5.0 and sd["ema"]["mean"].tolist() == [1.0, 2.0, 3.0]
    st.count = st.count + 1
    assert sd["count"].item() == 5.0  # state_dict holds clones
    assert {k: v.tolist() for k, v in st.readout().items()} == {"scratch": [1.0, 1.0]}

    st.reset("count")
    assert st.count.item() == 0.0 and st["ema.mean"].tolist() == [1.0, 2.0, 3.0]
    st.load_state_dict(sd)
    assert st.count.item() == 5.0
    st.load_state_dict({"ema.mean": torch.tensor([7.0, 8.0, 9.0])})  # flat names load too
    assert st["ema.mean"].tolist() == [7.0, 8.0, 9.0]
    st.reset()
    assert st.count.item() == 0.0 and st["ema.mean"].tolist() == [0.0, 0.0, 0.0]

    st.to("meta")
    assert st.device == torch.device("meta") and st.count.device.type == "meta"

    with pytest.raises(ValueError, match="declared after bind"):
        st.add_state("late", lambda dev: torch.zeros(()))
    with pytest.raises(KeyError, match="'nope' is not declared"):
        st["nope"] = torch.zeros(())


def test_device_state_loaded_before_bind_is_applied_at_bind() -> None:
    st = DeviceState()
    st.load_state_dict({"count": torch.tensor(3.0), "old_key": torch.tensor(1.0)})  # unknown names are ignored
    assert st.state_dict()["count"].item() == 3.0  # a checkpoint taken before the first step round-trips
    st.add_state("count", lambda dev: torch.zeros((), device=dev))
    st.bind(CPU)
    assert st.count.item() == 3.0


def test_device_state_rejects_wrong_shapes_and_missing_names() -> None:
    st = DeviceState()
    st.add_state("buf", lambda dev: torch.zeros(4, device=dev))
    st.bind(CPU)
    with pytest.raises(ValueError, match=r"`state` holds 'buf' of shape \(5,\) but this detector keeps \(4,\)"):
        st.load_state_dict({"buf": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"`state` lacks \['buf'\]"):
        st.load_state_dict({}, strict=True)
    with pytest.raises(ValueError, match="declared twice"):
        st.add_state("buf", lambda dev: torch.zeros(4, device=dev))


# ------------------------------------------------------------------------------------------ Latch
def test_latch_keeps_the_first_step_until_read() -> None:
    st = DeviceState()
    latch = Latch(st, "x", 3)
    st.bind(CPU)
    latch.update(torch.tensor([False, True, False]), torch.tensor(4.0), value=torch.tensor([0.0, 40.0, 0.0]))
    latch.update(torch.tensor([True, True, False]), torch.tensor(5.0), value=torch.tensor([51.0, 52.0, 0.0]))
    fired = latch.fired(read(st))
    assert [(f.index, f.step, f.value) for f in fired] == [(0, 5, 51.0), (1, 4, 40.0)]  # entry 1 kept step 4
    assert latch.step.tolist() == [-1.0, -1.0, -1.0]  # read: free again
    assert latch.fired(read(st)) == []
    latch.update(torch.tensor([False, True, False]), torch.tensor(9.0), value=torch.tensor([0.0, 90.0, 0.0]))
    assert [(f.index, f.step) for f in latch.fired(read(st))] == [(1, 9)]


def test_latch_with_a_vector_value() -> None:
    st = DeviceState()
    latch = Latch(st, "nf", 1, values={"layers": 1})  # one layer: the vector has the entry count's length
    st.bind(CPU)
    latch.update(torch.tensor(True), torch.tensor(2.0), layers=torch.tensor([1.0]))
    (f,) = latch.fired(read(st))
    assert f.step == 2 and f.values == {"layers": [1.0]} and math.isnan(f.value)


# ------------------------------------------------------------------------------------ Persistence
def test_persistence_streaks_against_reference() -> None:
    rng = random.Random(0)
    conds = [[rng.random() < 0.7 for _ in range(5)] for _ in range(40)]
    st = DeviceState()
    p = Persistence(st, "c", 5, persist=3)
    st.bind(CPU)
    streak = [0] * 5
    expected: dict[int, tuple[int, float]] = {}
    got: dict[int, tuple[int, float]] = {}
    for t, cond in enumerate(conds):
        value = [10.0 * t + i for i in range(5)]
        p.update(torch.tensor(cond), torch.tensor(value), torch.tensor(float(t)))
        for i in range(5):
            streak[i] = streak[i] + 1 if cond[i] else 0
            if streak[i] >= 3 and i not in expected:
                expected[i] = (t, value[i])
        assert p.streak.tolist() == streak
        if t % 7 == 6:  # a logging step every 7 steps
            got.update({f.index: (f.step, f.value) for f in p.fired(read(st)) if f.index not in got})
            assert got == expected
            # After a read the latch is free: a condition that persists fires again at its next step.
            expected, got = {}, {}


def test_persistence_immediate_fires_on_the_step_it_is_seen() -> None:
    st = DeviceState()
    p = Persistence(st, "c", 2, persist=5)
    st.bind(CPU)
    cond, value, now = torch.tensor([True, True]), torch.tensor([1.0, 2.0]), torch.tensor(0.0)
    p.update(cond, value, now, immediate=torch.tensor([False, True]))
    fired = p.fired(read(st))
    assert [(f.index, f.step, f.value) for f in fired] == [(1, 0, 2.0)]
    assert p.streak.tolist() == [1.0, 1.0]  # the streak itself is unchanged by immediacy


# ----------------------------------------------------------------------------------------- the EMAs
def _spike_reference(norms: list[float], alpha: float, z: float, factor: float, warmup: int):
    mean = var = count = 0.0
    spikes = []
    for t, n in enumerate(norms):
        usable = math.isfinite(n) and n > 0
        x = math.log(max(n, 1e-30)) if n == n else math.nan
        std = math.sqrt(var + 0.01)
        warm = count >= warmup
        if usable and warm and x - mean > z * std and x - mean > math.log(factor):
            spikes.append((t, math.exp(x - mean)))
        if usable:
            a = alpha if warm else count / (count + 1)
            xw = min(x, mean + 3 * std) if warm else x
            new_mean = a * mean + (1 - a) * xw
            var = max(a * var + (1 - a) * (xw - mean) * (xw - new_mean), 0.0)
            mean = new_mean
            count += 1
    return mean, var, count, spikes


def test_spike_ema_matches_float64_reference() -> None:
    rng = random.Random(1)
    norms = [math.exp(rng.gauss(0.0, 0.3)) for _ in range(80)]
    norms[10] = float("nan")  # not usable: leaves the EMA alone
    norms[30] *= 200.0  # a spike
    norms[33] *= 150.0  # in the same read window: the latch keeps the first one only
    norms[41] *= 150.0  # the winsorised EMA did not swallow the first spike: this one is seen too
    norms[50] = 0.0
    d = Spike(warmup=20)
    d.bind(ctx_for(1))
    found: list[Finding] = []
    for t, n in enumerate(norms):
        d.update(evidence(t, stats_of([n])))
        if t % 10 == 9:
            found += d.collect(read(d), t)
    mean, var, count, spikes = _spike_reference(norms, 0.95, 6.0, 10.0, 20)
    assert d.mean == pytest.approx(mean, rel=1e-6, abs=1e-7)  # float32 norms, float64 recursion
    assert d.var == pytest.approx(var, rel=1e-5, abs=1e-8)
    assert d.count == count == 78
    assert [s for s, _ in spikes] == [30, 33, 41]
    first_per_window = [(s, v) for s, v in spikes if s != 33]
    assert [(f.step, f.value) for f in found] == [(s, pytest.approx(v, rel=1e-4)) for s, v in first_per_window]
    assert found[0].kind == "spike" and found[0].evidence[0][0] == "typical_norm"


def test_time_vanishing_ema_matches_reference() -> None:
    ratios = [1e-3, 1e-9, 1e-12, 1e-15, 1e-2, 1e-20]
    seen = [True, True, False, True, True, True]
    d = TimeVanishing(min_ratio=1e-8, alpha=0.7, warmup=3)
    d.bind(ctx_for(2))
    ema = count = 0.0
    first_fire = None
    for t, (r, s) in enumerate(zip(ratios, seen)):
        prof = TimeProfile(
            log_ratio=torch.tensor([math.log(r)]), log_decay=torch.tensor([math.log(r) / 9]),
            steps=torch.tensor([10.0]), seen=torch.tensor([s]),
        )
        d.update(evidence(t, stats_of([1.0, 1.0]), times=prof))
        if s:
            a = 0.7 if count > 0 else 0.0
            ema = a * ema + (1 - a) * math.log(r)
            count += 1
            if first_fire is None and count >= 3 and ema < math.log(1e-8):
                first_fire = (t, math.exp(ema))
        assert d.state.ema.item() == pytest.approx(ema, rel=1e-5)
    (f,) = d.collect(read(d), 5)
    assert (f.step, f.value) == (first_fire[0], pytest.approx(first_fire[1], rel=1e-4))
    assert f.source == "time:rnn" and "each step back keeps" in f.message


def _growth_reference(norms: list[float], warmup: int, growth: float, persist: int) -> tuple[float, int, list]:
    ref_sum, ref_count, streak, fires = 0.0, 0, 0, []
    for t, n in enumerate(norms):
        usable = math.isfinite(n) and n > 0
        x = math.log(max(n, 1e-30)) if usable else 0.0
        ready = ref_count >= warmup
        excess = x - ref_sum / max(ref_count, 1)
        streak = streak + 1 if (usable and ready and excess > math.log(growth)) else 0
        if streak >= persist:
            fires.append((t, math.exp(excess)))
        if usable and not ready:
            ref_sum, ref_count = ref_sum + x, ref_count + 1
    return ref_sum, ref_count, fires


@pytest.mark.parametrize("reads", [range(1, 40), range(7, 40, 7), range(39, 40)], ids=["every", "seventh", "once"])
def test_exploding_growth_folded_per_window_matches_stepwise_reference(reads: range) -> None:
    """The early level and the growth check folded over windows of any length equal the step-by-step recursion."""
    rng = random.Random(3)
    norms = [math.exp(rng.gauss(0.0, 0.5)) for _ in range(40)]
    norms[1], norms[5] = float("inf"), 0.0  # not usable: the early level skips them
    for t in range(20, 40):
        norms[t] *= 10 ** (0.3 * (t - 19))  # a slow divergence: 2x per step
    d = Exploding(growth=100.0, growth_warmup=6, persist=2)
    d.bind(ctx_for(1))
    firsts = []
    for t, n in enumerate(norms):
        d.update(evidence(t, stats_of([n])))
        if t + 1 in reads or t == len(norms) - 1:
            firsts += [(f.step, f.value) for f in d.collect(read(d), t) if f.source == "growth"]
    ref_sum, ref_count, fires = _growth_reference(norms, 6, 100.0, 2)
    level = d.state_dict()["growth_ref"]
    assert level["count"].item() == ref_count == 6
    assert level["sum"].item() == pytest.approx(ref_sum, rel=1e-5)
    # The latch keeps the first firing step of each read window.
    bounds = sorted({0, *reads, len(norms)})
    expected = []
    for lo, hi in zip(bounds, bounds[1:]):
        hits = [(s, v) for s, v in fires if lo <= s < hi]
        expected += hits[:1]
    assert len(expected) >= 1
    assert [s for s, _ in firsts] == [s for s, _ in expected]
    assert [v for _, v in firsts] == [pytest.approx(v, rel=1e-4) for _, v in expected]


def _vanishing_reference(
    rows: list[tuple[float, float]], reads: set[int], persist: int
) -> list[tuple[str, int, float]]:
    """Stepwise float64 reference of Vanishing's model-wide checks over ``(early/late RMS ratio, ReLU on-fraction)``
    per step (2 tracked ReLU layers, depth_ratio 1e-4, no layer's ratio check holding): the first firing step of
    each check per read window, and no depth finding once dying ReLUs explain it."""
    streak, latched, out, explained = [0, 0], [None, None], [], False
    for t, (ratio, f) in enumerate(rows):
        depth = ratio < 1e-4
        gain = 2 * f  # sqrt(2 f) for each of the two layers
        for k, (cond, value) in enumerate(((depth, ratio), (depth and gain <= 1e-2, gain))):
            streak[k] = streak[k] + 1 if cond else 0
            if streak[k] >= persist and latched[k] is None:
                latched[k] = (t, value)
        if t in reads:
            if latched[1] is not None:
                out.append(("inactive", *latched[1]))
                explained = True
            if latched[0] is not None and not explained:
                out.append(("depth", *latched[0]))
            latched = [None, None]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_vanishing_model_wide_checks_on_the_host_match_a_stepwise_reference_and_resume_mid_window(seed: int) -> None:
    """Vanishing's depth and dying checks run on the host over figures read back at the logging step: the same
    findings as a stepwise reference for any read windows, and a checkpoint taken between reads (figures not read
    back yet), restored before or after bind, goes on exactly."""
    rng = random.Random(seed)
    n = 40
    rows = [(rng.choice([1.0, 1e-6, 1e-6]), rng.choice([0.5, 0.5, 0.5, 1e-3])) for _ in range(n)]
    reads = {t for t in range(n) if rng.random() < 0.3} | {n - 1}
    ctx = ctx_for(4)
    ctx.activation_names, ctx.activation_kinds, ctx.excluded_activations = ["a0", "a1"], ["relu"] * 2, [False] * 2

    def run(restore_at: int | None, before_bind: bool) -> list[tuple[str, int, float]]:
        d = Vanishing(persist=2)
        d.bind(ctx)
        found = []
        for t, (ratio, f) in enumerate(rows):
            if t == restore_at:
                sd = d.state_dict()
                d = Vanishing(persist=2)
                if before_bind:
                    d.load_state_dict(sd)
                    d.bind(ctx)
                else:
                    d.bind(ctx)
                    d.load_state_dict(sd)
            acts = ActivationStats(
                dead=torch.zeros(2), saturated=torch.zeros(2), seen=torch.ones(2, dtype=torch.bool),
                active=torch.full((2,), f),
            )
            d.update(evidence(t, stats_of([ratio, 1.0, 1.0, 1.0], param_norm=[1.0] * 4), activations=acts))
            if t in reads:
                found += [(f.source, f.step, f.value) for f in d.collect(read(d), t) if f.source != "ratio"]
        return found

    expected = _vanishing_reference(rows, reads, 2)
    assert run(None, False) == [(src, step, pytest.approx(v, rel=1e-5)) for src, step, v in expected]
    at = min(t for t in range(1, n) if t - 1 not in reads)  # a window with a step not read back yet
    for before_bind in (False, True):
        assert run(at, before_bind) == [(src, step, pytest.approx(v, rel=1e-5)) for src, step, v in expected]


def test_exploding_checkpoint_mid_window_resumes_the_same_findings() -> None:
    """The model-wide checks run on the host: a checkpoint taken between reads (figures not read back yet)
    keeps every check side by side, and a detector restored from it (before or after bind) goes on exactly."""
    norms = [1.0, 1.2, 0.9, 1.1, 5.0, 60.0, 900.0, 2e4, 3e5, 4e6, float("inf"), 1.0, 1.0]

    def run(restore_at: int | None, before_bind: bool) -> tuple[list[tuple[str, int, float]], dict]:
        d = Exploding(growth=100.0, growth_warmup=3, persist=2)
        d.bind(ctx_for(2))
        found = []
        for t, n in enumerate(norms):
            if t == restore_at:
                sd = d.state_dict()
                d = Exploding(growth=100.0, growth_warmup=3, persist=2)
                if before_bind:
                    d.load_state_dict(sd)
                    d.bind(ctx_for(2))
                else:
                    d.bind(ctx_for(2))
                    d.load_state_dict(sd)
            d.update(evidence(t, stats_of([n, n], param_norm=[1e6, 1e6])))
            if t % 4 == 3 or t == len(norms) - 1:
                found += [(f.source, f.step, f.value) for f in d.collect(read(d), t)]
        return found, d.state_dict()

    found, final = run(None, False)
    level = 1.08 ** (1 / 3)  # geometric mean of the first 3 norms (1.0, 1.2, 0.9); every norm is sqrt(2) n
    # Growth 100x held on steps 6 and 7 (persist 2), again on step 8 after the read; the Inf on step 10 follows
    # 13.3x growth (the rate into step 9), so the explosion, not only nonfinite, is reported there.
    assert found == [
        ("growth", 7, pytest.approx(2e4 / level, rel=1e-5)),
        ("growth", 8, pytest.approx(3e5 / level, rel=1e-5)),
        ("overflow", 10, pytest.approx(4e6 / 3e5, rel=1e-5)),
    ]
    # Every check side by side in the checkpoint: depth, ratio (2 layers), total, growth, overflow.
    assert {k: v.shape for k, v in final["checks"].items()} == {k: (2 + 4,) for k in final["checks"]}
    assert final["growth_ref"]["count"].item() == 3.0
    for at in (6, 10):  # mid-window (figures not read back yet), and right after the Inf
        for before_bind in (False, True):
            again, state = run(at, before_bind)
            assert again == [(src, step, pytest.approx(v, rel=1e-6)) for src, step, v in found]  # float32 checkpoint
            torch.testing.assert_close(state, final, equal_nan=True)


def test_persistence_window_fold_equals_stepwise_updates() -> None:
    rng = random.Random(4)
    T, n = 23, 6
    conds = torch.tensor([[rng.random() < 0.75 for _ in range(n)] for _ in range(T)])
    values = torch.randn(T, n)
    imm = torch.tensor([[rng.random() < 0.05 for _ in range(n)] for _ in range(T)])
    steps = torch.arange(100.0, 100.0 + T)
    a_state, b_state = DeviceState(), DeviceState()
    a, b = Persistence(a_state, "c", n, persist=4), Persistence(b_state, "c", n, persist=4)
    a_state.bind(CPU)
    b_state.bind(CPU)
    for lo, hi in ((0, 9), (9, 10), (10, T)):  # windows of 9, 1 and 13 steps
        for t in range(lo, hi):
            a.update(conds[t], values[t], steps[t], immediate=imm[t])
        b.update_window(conds[lo:hi], values[lo:hi], steps[lo:hi], immediate=imm[lo:hi])
        assert torch.equal(a.streak, b.streak)
        assert read(a_state) == read(b_state)
        assert a.fired(read(a_state)) == b.fired(read(b_state))


# ---------------------------------------------------------------------------------- detectors
def test_vanishing_depth_and_nonfinite_by_name() -> None:
    ctx = ctx_for(4)
    v, nf = Vanishing(persist=2), NonFinite()
    v.bind(ctx)
    nf.bind(ctx)
    for t in range(3):
        s = stats_of([1e-7, 1e-6, 1.0, 1.0], param_norm=[1.0, 1.0, 1.0, 1.0])
        ev = evidence(t, s)
        v.update(ev)
        nf.update(ev)
    # Every check runs on the host, over the raw figures of each step: the squared gradient norms, the weight
    # norms (new at every step here) and, at the first read, the per-layer floor and element counts.
    values = read(v)
    assert {k: len(x) for k, x in values.items()} == {"grad_norm": 3 * 4, "param_norm": 3 * 4, "floor": 4, "numel": 4}
    (f,) = v.collect(values, 2)
    # early quarter = l0, late quarter = l3: RMS ratio 1e-7
    assert (f.kind, f.source, f.step, f.layer) == ("vanishing", "depth", 1, "l0")
    assert f.value == pytest.approx(1e-7, rel=1e-4)
    assert nf.collect(read(nf), 2) == []
    nf.update(evidence(3, stats_of([1.0, float("nan"), float("inf"), 1.0])))
    (g,) = nf.collect(read(nf), 3)
    assert (g.step, g.layers, g.message) == (
        3, ("l2", "l1"),
        "Non-finite gradients (NaN/Inf) at step 3 in 2 layer(s), first in backward order: l2, l1.",
    )


def test_state_dict_round_trips_through_a_monitor_that_is_not_bound_yet() -> None:
    """A resumed monitor loads the detectors' state before its first step binds them."""
    ctx = ctx_for(4)
    a = Vanishing()
    a.bind(ctx)
    a.update(evidence(0, stats_of([1e-7, 1e-6, 1.0, 1.0])))
    sd = a.state_dict()  # folds the step not read yet
    assert set(sd) == {"checks"} and set(sd["checks"]) == {"streak", "fired_step", "fired_value"}
    assert sd["checks"]["streak"][0].item() == 1.0  # the depth check held once
    b = Vanishing()
    b.load_state_dict(sd)
    b.bind(ctx)
    for key in ("streak", "fired_step", "fired_value"):  # the host's depth and dying entries around the device's
        assert torch.equal(b.state_dict()["checks"][key], sd["checks"][key])
    assert b._host.streak == [1.0, 0.0] and b._zero.streak + b._ratio.streak == sd["checks"]["streak"][1:-1].tolist()
    e = Exploding()
    e.bind(ctx)
    assert set(e.state_dict()["growth_ref"]) == {"sum", "count"}
    s = Spike()
    s.bind(ctx)
    s.update(evidence(0, stats_of([2.0])))
    assert {k: v.item() for k, v in s.state_dict().items()} == {"mean": pytest.approx(math.log(2.0)), "var": 0.0,
                                                                "count": 1.0}
    s.load_state_dict({"mean": torch.tensor(0.5), "var": torch.tensor(0.1), "count": torch.tensor(30.0)})
    assert (s.mean, s.count) == (0.5, 30.0)


# ------------------------------------------------------------------------------- host-side checks
def test_host_persistence_equals_the_device_persistence_stepwise() -> None:
    """The per-layer checks that run on the host keep Persistence's semantics exactly: streaks, severity-scaled
    immediates, the first step and value latched until read, the last value kept after the read."""
    rng = random.Random(5)
    T, n = 60, 7
    state = DeviceState()
    dev = Persistence(state, "c", n, persist=3)
    state.bind(CPU)
    host = HostPersistence(n, persist=3)
    for t in range(T):
        cond = [rng.random() < 0.7 for _ in range(n)]
        imm = [rng.random() < 0.03 for _ in range(n)]
        values = [rng.uniform(-5, 5) for _ in range(n)]
        v32 = torch.tensor(values)
        dev.update(torch.tensor(cond), v32, torch.tensor(float(t)), immediate=torch.tensor(imm))
        host.advance([i for i in range(n) if cond[i]], v32.tolist(), t, [i for i in range(n) if imm[i]])
        assert host.streak == dev.streak.tolist()
        if rng.random() < 0.25 or t == T - 1:
            got = host.fired()
            want = dev.fired(read(state))
            assert [(f.index, f.step, f.value) for f in got] == [(f.index, f.step, f.value) for f in want]
            sd = state.state_dict()["c"]
            assert host.fired_step == sd["fired_step"].tolist() and host.fired_value == sd["fired_value"].tolist()


def test_host_layer_ratios_are_the_float32_device_figures() -> None:
    """The gradient-to-weight ratios compared on the host are the float32 figures the device computes (from
    the device's gradient norms, divided and rounded to float32), NaN where the ratio means nothing: a zero,
    infinite or NaN gradient, an absent layer, a weight norm at or below the zero-weight floor, or not finite."""
    rng = random.Random(6)
    n = 256
    ctx = ctx_for(n)
    ctx.numel = torch.tensor([float(rng.choice([1, 10, 1000, 10**6])) for _ in range(n)])
    lay = _LayerFigures(ctx)
    lay.take_consts({k: v.tolist() for k, v in lay.consts().items()})
    g = torch.tensor([rng.choice([0.0, math.inf, math.nan, *[10 ** rng.uniform(-30, 30)] * 5]) for _ in range(n)])
    norm = g.sqrt()  # the device's square roots (float32 sqrt on a CPU is not always correctly rounded)
    pn = torch.tensor([rng.choice([0.0, math.inf, 1e-9, *[10 ** rng.uniform(-4, 4)] * 5]) for _ in range(n)])
    present = tuple(rng.random() < 0.9 for _ in range(n))
    floor = 1e-6 * ctx.numel.sqrt()
    usable = (g > 0) & (g < math.inf) & torch.tensor(present)
    valid = usable & (pn > floor) & (pn < math.inf)
    want = torch.where(valid, norm / pn.clamp_min(1e-30), math.nan).tolist()
    lay.param_norm(pn.tolist(), 0)
    row = HostRow(0, present, {"grad_norm": norm.tolist()}, {})
    got = lay.ratios(row)
    assert [x if x == x else "nan" for x in got] == [x if x == x else "nan" for x in want]
    assert sum(x == x for x in want) > n // 4  # many ratios mean something


@pytest.mark.parametrize("order", ["vanishing_first", "exploding_first"])
def test_a_tensor_two_detectors_hand_over_travels_once_and_both_read_it(order: str) -> None:
    """Vanishing and Exploding both check the step's gradient and weight norms: the same tensor goes into the
    transfer once (the first detector's readout), and both find what each finds alone. Should the second
    collect before the first (not what the monitor does), it reads the tensor itself and finds the same."""
    ctx = ctx_for(4)
    rows = [[1e-9, 1e-6, 1.0, 1.0], [1e-9, 1e-6, 1.0, 1.0], [1e-9, 1e-6, 900.0, 1.0], [1e-9, 1e-6, 900.0, 1.0]]

    def run(together: bool) -> tuple[list[Finding], list[Finding], list[set[str]]]:
        v, e = Vanishing(persist=2), Exploding(persist=2)
        v.bind(ctx)
        e.bind(ctx)
        found_v, found_e, handed = [], [], []
        for t, g in enumerate(rows):
            ev = evidence(t, stats_of(g, param_norm=[1.0] * 4))
            v.update(ev)
            if not together:
                ev = evidence(t, stats_of(g, param_norm=[1.0] * 4))
            e.update(ev)
            rv, re_ = read(v), read(e)
            handed.append(set(re_))
            if order == "vanishing_first":
                found_v += v.collect(rv, t)
                found_e += e.collect(re_, t)
            else:
                found_e += e.collect(re_, t)
                found_v += v.collect(rv, t)
        return found_v, found_e, handed

    alone_v, alone_e, handed_alone = run(together=False)
    both_v, both_e, handed_both = run(together=True)
    assert (both_v, both_e) == (alone_v, alone_e)
    # Read every step: each latch is freed at the read and latches again while its streak holds.
    assert [(f.source, f.step) for f in alone_v] == [(src, t) for t in (1, 2, 3) for src in ("depth", "ratio")]
    assert [(f.source, f.step, f.layer) for f in alone_e] == [("ratio", 3, "l2")]
    assert handed_alone[0] == {"grad_norm", "param_norm", "total_norm", "floor", "numel"}
    assert handed_both[0] == {"total_norm", "floor", "numel"} and handed_both[1] == {"total_norm"}


# ------------------------------------------------------------------------------------ logging-step host work
def test_series_hands_one_value_over_as_it_is_and_a_window_as_one_float32_vector() -> None:
    """One step (log_every=1): the recorded 0-d tensor itself (no op; the transfer flattens it); several: one
    float32 vector, chunks included; ``take`` reads the same values on the host (checkpoints)."""
    s = Series(chunk=3)
    loss = torch.tensor(2.5, dtype=torch.float64)
    s.add(loss, 7)
    assert s.readout() is loss and s.steps() == [7]
    assert s.readout() is None and s.steps() == []
    values = [torch.tensor(float(i) + 0.1, dtype=torch.float64) for i in range(5)]
    for i, v in enumerate(values):
        s.add(v, 10 + i)
    out = s.readout()
    assert out is not None and out.dtype == torch.float32 and out.shape == (5,)
    assert out.tolist() == torch.tensor([float(i) + 0.1 for i in range(5)], dtype=torch.float32).tolist()
    assert s.steps() == [10, 11, 12, 13, 14]
    s.add(loss, 20)
    assert s.take() == [2.5] and s.steps() == [20]


def test_a_latch_the_host_knows_is_free_is_left_out_of_the_readout() -> None:
    """After a read that found nothing latched, and until the latch is updated again, its entries are known
    (every step -1): the readout leaves them out, and ``fired`` without them finds nothing."""
    st = DeviceState()
    st.add_state("other", lambda dev: torch.zeros(2, device=dev), readout=True)
    latch = Latch(st, "x", 3)
    st.bind(CPU)
    names = {"other", "x.fired_step", "x.fired_value"}
    assert set(st.readout()) == names  # not read yet (a loaded state may hold entries)
    assert latch.fired(read(st)) == [] and latch.known_free
    assert set(st.readout()) == {"other"}
    assert latch.fired({"other": [0.0, 0.0]}) == [] and latch.known_free
    latch.update(torch.tensor([False, True, False]), torch.tensor(4.0), value=torch.tensor([0.0, 40.0, 0.0]))
    assert not latch.known_free and set(st.readout()) == names
    assert [(f.index, f.step, f.value) for f in latch.fired(read(st))] == [(1, 4, 40.0)]
    assert latch.known_free and set(st.readout()) == {"other"}  # cleared by the read: known free
    st.load_state_dict({"x": {"fired_step": torch.tensor([-1.0, 3.0, -1.0])}})
    assert set(st.readout()) == names  # a loaded latch is read again
    assert [(f.index, f.step) for f in latch.fired(read(st))] == [(1, 3)]


@pytest.mark.parametrize("detector", [SmallUpdates, Oscillation])
def test_an_update_measurement_is_reduced_on_the_host_as_the_device_reduced_it(detector: type) -> None:
    """The largest per-layer update ratio, taken on the host from the float32 ratios read back, equals the device
    reduction it replaces (SmallUpdates: NaN as 0, Inf kept; Oscillation: NaN and Inf as 0), for vectors with
    NaN (no measurement), Inf (a weight at exactly 0), zeros and ratios across 60 orders of magnitude."""
    rng = random.Random(3)
    d = detector()
    posinf = math.inf if detector is SmallUpdates else 0.0
    for _ in range(300):
        n = rng.randint(1, 40)
        r = torch.tensor(
            [rng.choice([math.nan, math.inf, 0.0, *[10 ** rng.uniform(-30, 30)] * 6]) for _ in range(n)],
            dtype=torch.float32,
        )
        want = float(r.nan_to_num(0.0, posinf, -math.inf).amax())
        assert d.largest(r.tolist()) == want


def test_the_ratio_prefilter_never_misses_a_float32_crossing() -> None:
    """A step skips the float32 ratios when no float64 quotient crosses the bound: rounding to float32 is monotonic,
    so no float32 ratio crosses it either. Checked against the ratios themselves with quotients within a few float32
    ulps of either bound (both sides), and anywhere."""
    rng = random.Random(8)
    n = 3
    lay = _LayerFigures(ctx_for(n))
    lay.take_consts({k: v.tolist() for k, v in lay.consts().items()})
    low, high = array("f", [1e-8])[0], array("f", [50.0])[0]
    skipped = near = 0
    for _ in range(3000):
        lay.param_norm([10 ** rng.uniform(-2, 3) for _ in range(n)], 0)
        pn = list(lay._pn)  # type: ignore[arg-type]
        ulps = [(1 + rng.choice([-1, 1]) * 2.0 ** -rng.randint(21, 27)) for _ in range(n)]
        norms = [rng.choice([low, high, 10 ** rng.uniform(-12, 4)]) * p * u for p, u in zip(pn, ulps)]
        row = HostRow(0, (True,) * n, {"grad_norm": norms}, {})
        ratios = lay.ratios(row)
        for test, crossed in ((low.__gt__, any(r < low for r in ratios)), (high.__lt__, any(r > high for r in ratios))):
            if not lay.may_cross(row, test):
                skipped += 1
                near += any(abs(r / b - 1) < 2**-20 for r in ratios for b in (low, high))
                assert not crossed
    assert skipped > 1000 and near > 100  # skipped steps, many with a ratio at a bound
