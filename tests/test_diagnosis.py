"""Diagnosis beyond the gradients (issue 11): evidence (update ratio, input scale, loss, optimizer),
the new kinds (accumulating, no_gradient), severity-scaled persistence, and no host read added on
non-logging steps by the loss and optimizer paths."""

from __future__ import annotations

import math

import pytest
import torch
from _syncs import count_syncs
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.detectors import LossDivergence, Oscillation, SmallUpdates
from gradwatch.evidence import Evidence, GradCarry, UpdateTracker
from gradwatch.layers import discover_layers


def batch(t: int, n: int = 64, d: int = 20, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher-labelled batch (fixed per step)."""
    g = torch.Generator().manual_seed(t)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, k, generator=torch.Generator().manual_seed(1234))
    return x, (x @ w).argmax(1)


def mlp(width: int = 64, depth: int = 2, din: int = 20) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = din
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 5))


def run(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    zero: bool = True,
    set_to_none: bool = True,
    scale: float = 1.0,
    micro: int = 1,
    forward=None,
    **kw,
) -> gw.GradWatch:
    """A plain loop passing the loss and the optimizer to ``step``."""
    mon = gw.GradWatch(model, sinks=[], on_alert="ignore", **kw)
    for t in range(steps):
        for k in range(micro):
            x, y = batch(t * micro + k)
            out = forward(model, scale * x) if forward is not None else model(scale * x)
            loss = F.cross_entropy(out, y) / micro
            loss.backward()
        mon.step(loss=loss, optimizer=opt)
        opt.step()
        if zero:
            opt.zero_grad(set_to_none=set_to_none)
    mon.close()
    return mon


def kinds(mon: gw.GradWatch) -> list[tuple[str, int]]:
    return [(a.kind, a.step) for a in mon.alerts]


# ----------------------------------------------------------------------------------------- evidence
def test_update_ratio_matches_a_float64_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))  # every tensor <= 1024 entries: exact
    layers = discover_layers(model, "module")
    tracker = UpdateTracker(layers, torch.device("cpu"))
    before = [p.detach().double().clone() for p in model.parameters()]
    tracker.snapshot(step=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    model(torch.randn(32, 8)).square().mean().backward()
    opt.step()
    step, ratio = tracker.measure()
    after = [p.detach().double() for p in model.parameters()]
    expected = []
    for i in (0, 1):  # (weight, bias) of each Linear
        d2 = sum(float((a - b).square().sum()) for a, b in zip(after[2 * i : 2 * i + 2], before[2 * i : 2 * i + 2]))
        w2 = sum(float(b.square().sum()) for b in before[2 * i : 2 * i + 2])
        expected.append(math.sqrt(d2 / w2))
    assert step == 0
    assert ratio.tolist() == pytest.approx(expected, rel=1e-5)
    assert tracker.measure() is None  # one measure per snapshot
    assert tracker.memory_bytes == (8 * 16 + 16 + 16 * 2 + 2) * 8  # two float32 samples


def test_update_ratio_samples_at_most_1024_entries_per_tensor():
    model = nn.Linear(300, 100)  # 30000 weights: a strided sample
    tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
    assert tracker.memory_bytes == (1024 + 100) * 8  # 64 runs of 16 weights, every bias entry; before and after


def test_input_scale_is_measured_on_logging_steps_only():
    torch.manual_seed(0)
    model = mlp()
    armed = [True]
    ev = Evidence(model, discover_layers(model, "module"), lambda: armed[0])
    ev.bind(ev.layers, torch.device("cpu"))
    x = 100 * batch(0)[0]
    model(x)
    ev.begin(0, None, None)
    values = {k: v.tolist() for k, v in ev.readout().items()}
    ev.absorb(values)
    snap = ev.snapshot()
    assert snap.input_rms == pytest.approx(float(x.double().square().mean().sqrt()), rel=1e-6)
    assert snap.input_max == pytest.approx(float(x.abs().max()), rel=1e-6)
    assert snap.batch_size == 64
    armed[0] = False  # a non-logging step's forward: the hook does nothing
    with count_syncs() as calls:
        model(x)
    assert calls == [] and "input" not in ev.readout()
    ev.remove()
    assert not model._forward_pre_hooks


def test_update_ratio_is_a_metric_at_logging_steps_and_the_optimizer_is_evidence():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=2)
    reports = []
    for t in range(3):
        x, y = batch(t)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        reports.append(mon.step(loss=loss, optimizer=opt))
        opt.step()
        opt.zero_grad()
    mon.close()
    m0, m2 = reports[0].metrics, reports[2].metrics
    opt_info = mon._evidence.snapshot().optimizer
    assert opt_info is not None and opt_info.describe() == "SGD lr 0.05"
    assert not any(k.startswith("update_ratio/") for k in m0)  # nothing measured before the first update
    assert set(k for k in m2 if k.startswith("update_ratio/")) == {"update_ratio/0", "update_ratio/2", "update_ratio/4"}
    assert all(0 < v < 1 for k, v in m2.items() if k.startswith("update_ratio/"))


def test_grad_carry_answers_on_the_host_for_new_tensors():
    model = nn.Linear(4, 2)
    carry = GradCarry(discover_layers(model, "module"), torch.device("cpu"))
    model(torch.randn(3, 4)).sum().backward()
    assert carry.observe() is None  # first look: nothing to compare
    model.zero_grad(set_to_none=True)
    model(torch.randn(3, 4)).sum().backward()
    with count_syncs() as calls:
        assert carry.observe() is None  # new tensors: nothing carried, no device work
    assert calls == []
    model(torch.randn(3, 4)).sum().backward()  # no zero_grad: the same tensors, accumulated into
    sample = carry.observe()
    assert sample is not None and sample.carried.tolist() == [True]
    assert torch.equal(sample.values, torch.cat([model.weight.grad.reshape(-1), model.bias.grad]))


# ----------------------------------------------------------------------------------- accumulating
def test_missing_zero_grad_is_named_within_a_few_steps():
    torch.manual_seed(0)
    model = mlp()
    mon = run(model, torch.optim.Adam(model.parameters(), 1e-3), 40, zero=False)
    assert kinds(mon)[0] == ("accumulating", 6)  # comparisons from step 1: five by step 5, all layers by 6
    a = mon.alerts[0]
    assert 0.95 <= a.value <= 1.5
    assert a.message.startswith(
        f"Gradients carried over across optimizer steps at step 6: the gradient of {a.layer} (and 2 more layer(s)) "
        "is the previous step's plus a new one ("
    )
    assert a.remedies[0] == (
        "Call optimizer.zero_grad() once per optimizer step, after optimizer.step(): the gradient applied over `0`, "
        "`2`, `4` is the sum of every step's gradient since it was last zeroed, a step that grows without bound."
    )


@pytest.mark.parametrize(
    "loop",
    [
        dict(set_to_none=True),
        dict(set_to_none=False),
        dict(set_to_none=True, micro=4),
        dict(set_to_none=False, micro=4),
    ],
    ids=["zero_grad", "set_to_none=False", "accumulation", "accumulation, set_to_none=False"],
)
def test_loops_that_zero_are_silent(loop):
    torch.manual_seed(0)
    model = mlp()
    mon = run(model, torch.optim.Adam(model.parameters(), 1e-3), 80, **loop)
    assert mon.alerts == []


# ------------------------------------------------------------------------------------ no_gradient
class EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(20, 64), nn.ReLU())
        self.head = nn.Linear(64, 5)
        self.aux = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_layer_the_loss_never_reaches_is_no_gradient():
    torch.manual_seed(0)
    model = EncoderHead()
    mon = run(model, torch.optim.Adam(model.parameters(), 1e-3), 30)
    assert kinds(mon) == [("no_gradient", 19)]
    a = mon.alerts[0]
    assert a.layer == "aux"
    assert a.message == (
        "No gradient at step 19: aux got none for 20 steps (since step 0) while the other layers did: the loss "
        "never reaches it."
    )
    assert a.remedies[0].startswith("`aux` never reaches the loss: call it in forward()")


def test_stale_zero_gradient_is_no_gradient_not_vanishing():
    torch.manual_seed(0)
    model = EncoderHead()
    for p in model.aux.parameters():
        p.grad = torch.zeros_like(p)  # kept at zero by zero_grad(set_to_none=False): backward never writes it
    mon = run(model, torch.optim.Adam(model.parameters(), 1e-3), 30, set_to_none=False)
    assert kinds(mon) == [("no_gradient", 20)]  # probed from the first logging step's read: steps 1..20


def test_detached_encoder_is_no_gradient():
    torch.manual_seed(0)
    model = EncoderHead()
    mon = run(model, torch.optim.Adam(model.parameters(), 1e-3), 30,
              forward=lambda m, x: m.head(m.encoder(x).detach()))
    assert kinds(mon) == [("no_gradient", 19)]
    assert mon.alerts[0].message.startswith("No gradient at step 19: encoder.0 (and 1 more layer(s)) got none")


class GatedBranch(nn.Module):
    """A residual branch multiplied by a constant 0.0 gate: backward reaches it and writes exact zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(20, 64)
        self.branch = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        return self.head(h + 0.0 * self.branch(h))


def test_branch_behind_a_constant_zero_gate_is_no_gradient_not_vanishing():
    # Exact zeros that no zero weight and no dead layer explain (the ReLUs are alive): the branch gets no gradient.
    torch.manual_seed(0)
    model = GatedBranch()
    mon = run(model, torch.optim.Adam(model.parameters(), 1e-3), 30, track_activations=True)
    assert kinds(mon) == [("no_gradient", 19)]
    assert mon.alerts[0].message.startswith("No gradient at step 19: branch.0 (and 1 more layer(s)) got none")
    assert mon.alerts[0].remedies[0].endswith("or a constant 0 factor (a gate or mask left at 0) on its output.")
    # Without tracked activations dead ReLUs cannot be ruled out: the exact zeros stay vanishing's.
    torch.manual_seed(0)
    model = GatedBranch()
    mon = run(model, torch.optim.Adam(model.parameters(), 1e-3), 30)
    assert kinds(mon) == [("vanishing", 2)]
    # The same zeros behind all-zero weights stay vanishing's (tests/test_scenarios.py, all-zero init).


def test_frozen_and_unoptimised_parameters_are_silent():
    torch.manual_seed(0)
    model = EncoderHead()
    model.encoder.requires_grad_(False)  # frozen: not watched
    opt = torch.optim.Adam(model.head.parameters(), 1e-3)  # aux: trainable, in no optimizer
    mon = run(model, opt, 40)
    assert mon.alerts == []


def test_optimizer_over_frozen_parameters_only_is_named_at_once():
    torch.manual_seed(0)
    model = EncoderHead()
    model.head.requires_grad_(False)
    mon = run(model, torch.optim.Adam(model.head.parameters(), 1e-3), 3)
    a = next(a for a in mon.alerts if a.kind == "no_gradient")
    assert (a.step, a.severity, a.layer) == (0, "error", None)
    assert a.remedies[0].startswith(
        "`head.weight`, `head.bias` have requires_grad=False but are the only parameters the optimizer updates"
    )


# ------------------------------------------------------------------- severity-scaled persistence
def test_fast_explosion_is_exploding_no_later_than_nonfinite_and_both_name_the_init():
    torch.manual_seed(0)
    # 20 ReLU layers at 2.5x the He std: total norm 3.9e17 at step 0, NaN from step 1.
    model = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(32, 32), nn.ReLU())], nn.Linear(32, 5))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=2.5 * math.sqrt(2 / m.in_features))
                nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gw.GradWatch(model, sinks=[], on_alert="ignore")
    for t in range(4):
        x, _ = batch(t, d=32)
        loss = model(x).square().mean()
        loss.backward()
        mon.step(loss=loss, optimizer=opt)
        opt.step()
        opt.zero_grad()
    mon.close()
    first = {k: s for k, s in reversed(kinds(mon))}
    assert (first["exploding"], first["nonfinite"]) == (0, 1)  # fired on the step it was seen, before the Inf
    exploding = next(a for a in mon.alerts if a.kind == "exploding")
    nonfinite = next(a for a in mon.alerts if a.kind == "nonfinite")
    assert exploding.value > 50 * 1e4
    assert f"It ends the explosion reported at step {first['exploding']} (`exploding`)." in nonfinite.message
    for a in (exploding, nonfinite):
        assert a.remedies[0].startswith("Initialise `0`, `2`, `4`, `6` (and 17 more, 21 in all) with He init")
        assert "2.5x the He value" in a.remedies[0]


def test_borderline_explosion_still_needs_its_streak():
    # ||g||/||w|| = 60 every step (just past 50): fires at the third step, not the first.
    model = nn.Linear(4, 4, bias=False)
    mon = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=1)
    for _ in range(4):
        with torch.no_grad():
            model.weight.grad = 60 * model.weight.detach().clone()
        mon.step()
    mon.close()
    assert kinds(mon) == [("exploding", 2)]


# ------------------------------------------------------------------------------- learning rate
def test_learning_rate_that_kills_relus_is_named_with_its_update():
    torch.manual_seed(0)
    model = mlp(depth=3)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    mon = run(model, torch.optim.SGD(model.parameters(), lr=3.0), 40, track_activations=True)
    dead = next(a for a in mon.alerts if a.kind == "dead")
    assert dead.remedies[0].startswith("Lower the learning rate: SGD lr 3 moved `")
    assert "of its weights in one step at step 0 (~0.1% is healthy)." in dead.remedies[0]


def test_learning_rate_far_too_low_is_vanishing_updates():
    torch.manual_seed(0)
    model = mlp()
    mon = run(model, torch.optim.Adam(model.parameters(), 1e-7), 40)
    assert kinds(mon) == [("vanishing", 20)]  # measured at steps 1, 11, 21: three logging steps
    a = mon.alerts[0]
    assert a.layer is None and a.value < 1e-5
    assert a.remedies[0].startswith("Raise the learning rate: Adam lr 1e-07 moved no layer by more than ")


def test_small_updates_need_a_flat_loss():
    d = SmallUpdates()
    # The loss falls: tiny updates of a converged or decayed run are not a fault.
    assert d.fold([2.0, 1.0, 0.5], [0, 10, 20], [1e-6, 1e-6, 1e-6], [0, 10, 20]) == []
    d = SmallUpdates()
    fired = d.fold([2.0, 2.0, 2.0, 2.0], [0, 10, 20, 30], [1e-6, 2e-6, 3e-6, 1e-6], [1, 11, 21, 31])
    assert fired == [(21, 3e-6)]


def test_loss_divergence_needs_loss_and_gradients_rising_together():
    d = LossDivergence()
    steps = list(range(20))
    losses = [1.0] * 10 + [30.0] * 10
    flat = [1.0] * 20
    assert d.fold(losses, flat, steps) == []  # the loss alone: not a divergence
    d = LossDivergence()
    fired = d.fold(losses, [1.0] * 10 + [100.0] * 10, steps)
    # The EMA (alpha 0.9) passes 10x the early loss at step 13 (30 - 29 * 0.9^4 = 10.97); held 3 steps.
    assert [s for s, _, _ in fired] == [15]


# ----------------------------------------------------------------------------------------- syncs
@pytest.mark.parametrize("loop", ["zero_grad", "set_to_none=False", "no zero_grad"])
def test_loss_and_optimizer_paths_add_no_host_read_on_non_logging_steps(loop):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gw.GradWatch(model, sinks=[], on_nonfinite="warn", on_alert="ignore", log_every=5)
    per_step = []
    for t in range(12):
        x, y = batch(t)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        with count_syncs() as calls:
            mon.step(loss=loss, optimizer=opt)
        per_step.append(list(calls))
        opt.step()
        if loop != "no zero_grad":
            opt.zero_grad(set_to_none=loop == "zero_grad")
    mon.close()
    for step, calls in enumerate(per_step):
        assert calls == (["tolist"] if step % 5 == 0 else []), step
    # The carried path did its work on the device: the missing zero_grad is found (at the step-10 read).
    assert [a.kind for a in mon.alerts] == (["accumulating"] if loop == "no zero_grad" else [])


def test_recurrent_models_are_profiled_across_time_by_default():
    gru = nn.GRU(3, 8, batch_first=True)
    assert gw.GradWatch(gru, sinks=[]).track_time is True
    assert gw.GradWatch(gru, sinks=[], track_time=False).track_time is False
    assert gw.GradWatch(nn.Linear(3, 3), sinks=[]).track_time is False


# ---------------------------------------------------------------------------------------- attention
class _Attention(nn.Module):
    """Single-head self-attention over (batch, 16, 32) inputs; ``scale`` on the scores, q/k weights times ``gain``."""

    def __init__(self, scale: float, gain: float) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)
        self.scale = scale
        with torch.no_grad():
            self.q.weight.mul_(gain)
            self.k.weight.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) * self.scale, -1)
        return self.head((x + p @ self.v(x)).mean(1))


def _attention_batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(32, 16, 32, generator=torch.Generator().manual_seed(t))
    return x, (x[:, :, :4].sum((1, 2)) > 0).long() * 2 + (x[:, 0, 4] > 0).long()


def test_attention_probe_measures_the_softmax_jacobian_trace_against_float64():
    torch.manual_seed(0)
    model = _Attention(1.0, 4.0)
    armed = [True]
    ev = Evidence(model, discover_layers(model, "module"), lambda: armed[0])
    assert ev.attention is not None and ev.attention.pairs == (("q", "k"),)
    x = _attention_batch(0)[0]
    model(x)
    sample = ev.attention.take()
    armed[0] = False  # a non-logging step's forward: the hooks keep nothing, and no host read happens
    with count_syncs() as calls:
        model(x)
    assert calls == [] and ev.attention.take() is None
    with torch.no_grad():
        q, k = model.q(x).double(), model.k(x).double()
        p = torch.softmax(q @ k.transpose(1, 2) / 32, -1)
        want = float((1 - p.square().sum(-1)).mean() / (1 - 1 / 16))
    assert sample is not None and sample.pairs == (("q", "k"),)
    assert float(sample.passing[0]) == pytest.approx(want, rel=1e-5)
    ev.remove()
    assert not model.q._forward_hooks and not model.k._forward_hooks


def _train_attention(scale: float, gain: float, steps: int = 60) -> gw.GradWatch:
    torch.manual_seed(0)
    model = _Attention(scale, gain)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mon = gw.GradWatch(model, sinks=[], on_alert="ignore")
    for t in range(steps):
        x, y = _attention_batch(t)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss=loss, optimizer=opt)
        opt.step()
        opt.zero_grad()
    mon.close()
    return mon


def test_saturated_attention_is_vanishing_on_q_and_k_with_the_score_scale_first():
    mon = _train_attention(1.0, 32.0)  # no 1/sqrt(d), q/k weights 32x PyTorch's init
    assert kinds(mon) == [("vanishing", 20)]  # measured at steps 0, 10, 20: three logging steps
    alert = mon.alerts[0]
    assert alert.layer == "q"
    assert alert.message.startswith("Vanishing gradients through attention at step 20: the softmax of the scores of q")
    assert alert.remedies[0].startswith("Scale the attention scores by 1/sqrt(d)")


@pytest.mark.parametrize("scale, gain", [(32**-0.5, 1.0), (1.0, 1.0)])
def test_healthy_attention_is_silent(scale, gain):
    assert kinds(_train_attention(scale, gain)) == []


# -------------------------------------------------------------------------------------- oscillation
def _train_circles(batch_size: int, lr: float, steps: int = 120) -> gw.GradWatch:
    from gradwatch.bench.data import Sampler, circles

    x, y = circles()
    batches = Sampler(x, y, batch_size)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(), nn.Linear(64, 64), nn.LeakyReLU(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = gw.GradWatch(model, sinks=[], on_alert="ignore")
    for t in range(steps):
        xb, yb = batches(t)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        mon.step(loss=loss, optimizer=opt)
        opt.step()
        opt.zero_grad()
    mon.close()
    return mon


def test_oscillating_loss_with_one_sample_per_step_is_named_with_the_batch_size():
    mon = _train_circles(1, 1.0)  # AUTOTRAINER's oscillating loss: SGD lr 1.0, batch size 1
    assert kinds(mon) == [("spike", 50)]
    alert = mon.alerts[0]
    assert alert.message.startswith("Unstable training at step 50: updates moved a layer by ")
    assert alert.remedies[0].startswith("Raise the batch size: with 1 sample(s) per step")


def test_the_same_model_with_batches_of_32_is_silent():
    assert kinds(_train_circles(32, 0.1)) == []


def test_oscillation_needs_large_updates_and_a_loss_that_does_not_improve():
    det = Oscillation()
    flat = [1.0] * 40
    # Large updates at logging steps 0, 10, 20 with a flat loss: fires at the third.
    assert det.fold(flat, list(range(40)), [0.3, 0.2, 0.5], [0, 10, 20]) == [(20, 0.5)]
    det = Oscillation()
    falling = [2.0 * 0.97**t for t in range(40)]  # the EMA improves by 1% every step or so
    assert det.fold(falling, list(range(40)), [0.3, 0.2, 0.5], [0, 10, 20]) == []
    det = Oscillation()
    assert det.fold(flat, list(range(40)), [0.3, 0.05, 0.5], [0, 10, 20]) == []  # one measurement below 0.1


# -------------------------------------------------------------------------------------- dying ReLUs
def test_activation_tracker_measures_the_fraction_of_relu_outputs_on():
    from gradwatch.activations import ActivationTracker

    torch.manual_seed(0)
    model = mlp(width=16, depth=2)
    tracker = ActivationTracker(model, torch.device("cpu"))
    x = batch(0)[0]
    with torch.no_grad():
        h1, g1 = torch.relu(model[0](x)), torch.relu(model[0](2 * x))
        h2, g2 = torch.relu(model[2](h1)), torch.relu(model[2](g1))
    model(x)
    model(2 * x)  # two forwards in one step (micro-batches) are averaged
    got = tracker.take().active
    want = [((a > 0).double().mean() + (b > 0).double().mean()) / 2 for a, b in ((h1, g1), (h2, g2))]
    assert got is not None and got.tolist() == pytest.approx([float(w) for w in want], rel=1e-6)
    tracker.remove()


def _deep_narrow_relu(seed: int, steps: int = 20) -> gw.GradWatch:
    """AUTOTRAINER's 34-layer ReLU net of width 8 (He init) on inputs in [-1, 0], Adam lr 1e-3."""
    g = torch.Generator().manual_seed(0)
    x, y = -torch.rand(4096, 4, generator=g), torch.randint(0, 2, (4096,), generator=g)
    torch.manual_seed(seed)
    sizes = [4] + [8] * 34 + [2]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()] if i < len(sizes) - 2 else [nn.Linear(sizes[i], 2)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for lin in model[::2]:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            lin.bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = gw.GradWatch(model, sinks=[], on_alert="ignore", track_activations=True)
    for t in range(steps):
        idx = torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(seed * 1_000_003 + t))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        mon.step(loss=loss, optimizer=opt)
        opt.step()
        opt.zero_grad()
    mon.close()
    return mon


def test_vanishing_explained_by_relus_that_are_off_is_dead_on_the_same_step():
    mon = _deep_narrow_relu(4)  # the gradient vanishes along depth 5 steps before a layer dies outright
    first = mon.alerts[0]
    assert (first.kind, first.step, first.layer) == ("dead", 9, None)
    assert first.message.startswith("Dying ReLUs at step 9: the gradient vanishes along depth, and the ReLU units")
    assert first.remedies[0].startswith("Replace `1`, `3`, `5`, `7` (and 30 more, 34 in all) with nn.LeakyReLU")
    assert all(a.kind != "vanishing" or a.step > 9 for a in mon.alerts)


def test_deep_narrow_relu_net_that_survives_is_silent():
    assert kinds(_deep_narrow_relu(7, steps=40)) == []
