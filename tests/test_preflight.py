"""gw.preflight: every reference pathology at step 0, silence on healthy models, the user's state untouched."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from _models import PreLNTransformer, SmallResNet, batch, loss_of
from _models import mlp as _models_mlp
from test_scenarios import HEALTHY
from torch import nn

import gradwatch as gw
from gradwatch.preflight import preflight
from gradwatch.preflight_report import LayerRow, PreflightReport
from gradwatch.reference.scenarios import SCENARIOS

_PATHOLOGIES = [(s, v) for s in SCENARIOS.values() for v in s.pathologies]
_REMEDIES = [(s, v) for s in SCENARIOS.values() for v in s.remedies]


def _scenario_run(scenario, variant, *, with_optimizer=True):
    task = scenario.task()
    x, y = task.batch(0)
    torch.manual_seed(scenario.seed)
    model = variant.build()
    opt = None
    if with_optimizer:
        kind = torch.optim.SGD if scenario.optimizer == "sgd" else torch.optim.Adam
        opt = kind(model.parameters(), lr=scenario.lr)
    clip = variant.clip() if variant.clip is not None else None
    return preflight(model, (x, y), task.loss, optimizer=opt, clip=clip)


# Where each pathology shows first. The clipping scenario's pathology is a learning rate past the
# stability limit: in training it surfaces as `nonfinite` 5 steps in; pre-flight names the cause
# (the loss on its own batch rises at every step) as an explosion, on the last of its 3 steps.
_FIRST = {
    ("activation", "sigmoid"): ("vanishing", 0, "0"),
    ("recurrence", "rnn"): ("vanishing", 0, "rnn"),
    ("residual", "plain"): ("vanishing", 0, "0"),
    ("initialisation", "zero"): ("vanishing", 0, "0"),
    ("initialisation", "small"): ("vanishing", 0, "0"),
    ("initialisation", "large"): ("exploding", 0, "40"),
    ("normalisation", "plain"): ("vanishing", 0, "0"),
    ("clipping", "none"): ("exploding", 2, None),
}


def test_every_pathology_is_listed():
    assert sorted(_FIRST) == sorted((s.name, v.name) for s, v in _PATHOLOGIES)


@pytest.mark.parametrize(("scenario", "variant"), _PATHOLOGIES, ids=[f"{s.name}-{v.name}" for s, v in _PATHOLOGIES])
def test_pathology_is_found_before_training(scenario, variant):
    report = _scenario_run(scenario, variant)
    first = report.alerts[0]
    assert not report.ok
    assert (first.kind, first.step, first.layer) == _FIRST[(scenario.name, variant.name)]
    assert report.kinds == [first.kind]
    assert first.remedies  # the same ranked remedies as a training alert
    if first.step == 0:  # structural: found without an optimizer too
        plain = _scenario_run(scenario, variant, with_optimizer=False)
        assert [(a.kind, a.step, a.layer) for a in plain.alerts] == [(first.kind, 0, first.layer)]


@pytest.mark.parametrize(("scenario", "variant"), _REMEDIES, ids=[f"{s.name}-{v.name}" for s, v in _REMEDIES])
def test_remedy_is_ok(scenario, variant):
    report = _scenario_run(scenario, variant)
    assert report.ok, [a.message for a in report.alerts]
    assert report.alerts == []


def test_sigmoid_stack_alert_is_the_training_alert_at_step_0():
    sc = SCENARIOS["activation"]
    report = _scenario_run(sc, sc.variant("sigmoid"))
    (alert,) = report.alerts
    assert alert.message.startswith("Vanishing gradients along depth at step 0: the earliest layers (from 0) get ")
    assert alert.value < 1e-10 and alert.threshold == 1e-4
    assert alert.remedies[0].startswith("Replace the sigmoid activations `1`, `3`, `5`, `7` (and 16 more, 20 in all)")


def test_divergence_names_the_learning_rate():
    sc = SCENARIOS["clipping"]
    report = _scenario_run(sc, sc.variant("none"))
    (alert,) = report.alerts
    a, b, c = report.losses
    assert a < b < c and c / a == pytest.approx(alert.value)
    assert alert.threshold == 2.0 and alert.severity == "warning"
    curve = f"{a:.3g} -> {b:.3g} -> {c:.3g}"
    assert alert.message.startswith(
        f"Divergence at step 2: with SGD(lr=0.6) the loss on the pre-flight batch rose at every step, {curve} ("
    )
    assert alert.remedies[0].startswith("Lower the learning rate of SGD(lr=0.6) (try 1/10), or add a warm-up")
    assert alert.remedies[1].startswith("Clip gradients: gw.clip.Norm(max_norm=")
    # Without the optimizer there is no step to overshoot: the model itself is fine.
    assert _scenario_run(sc, sc.variant("none"), with_optimizer=False).ok


@pytest.mark.parametrize("name", list(HEALTHY), ids=list(HEALTHY))
def test_healthy_models_are_ok(name):
    build, task, _ = HEALTHY[name]
    torch.manual_seed(0)
    model = build()
    x, y = batch(task, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    report = preflight(model, (x, y), lambda out, t: loss_of(task, out, t), optimizer=opt)
    assert report.ok, [a.message for a in report.alerts]
    assert preflight(model, (x, y), lambda out, t: loss_of(task, out, t)).ok


# ---------------------------------------------------------------------------------------------- state
class _Net(nn.Module):
    """Dropout (draws random numbers), BatchNorm (running statistics), a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.act(self.bn(self.fc(x)))))


def _hooks(model: nn.Module) -> list:
    out = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            out.append((name, attr, list(getattr(m, attr).items())))
    for name, p in model.named_parameters():
        out.append((name, "param", p._backward_hooks, getattr(p, "_post_accumulate_grad_hooks", None)))
    return out


def test_model_optimizer_rng_and_hooks_are_untouched():
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(2):  # the optimizer has state (moments, step) and the weights moved
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # The user's own monitor and forward hook are installed; .grad is left set from the last backward.
    user_monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", track_activations=True, log_every=1)
    calls = []
    model.act.register_forward_hook(lambda m, a, o: calls.append(1))
    model.eval()
    np.random.seed(3)
    random.seed(4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = opt.state_dict()
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in opt_state["state"].items()}
    groups = [dict(g) for g in opt_state["param_groups"]]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    hooks = _hooks(model)

    report = preflight(model, (x, y), nn.functional.cross_entropy, optimizer=opt, steps=3)

    assert len(report.losses) == 3 and report.optimizer == "Adam(lr=0.01)"
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())  # bitwise, BN running stats included
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not model.training
    s2 = opt.state_dict()
    assert [dict(g) for g in s2["param_groups"]] == groups
    assert all(torch.equal(s2["state"][i][k], v) for i, s in moments.items() for k, v in s.items())
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    np_state = np.random.get_state()
    assert np_state[0] == rng[2][0] and np.array_equal(np_state[1], rng[2][1]) and np_state[2:] == rng[2][2:]
    assert _hooks(model) == hooks
    assert calls == []  # the user's hook saw none of the copy's forwards
    # The user's monitor saw nothing either: its first step is an ordinary step 0 with one forward.
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    assert user_monitor.step().step == 0
    user_monitor.close()


_OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "two_groups": lambda ps: torch.optim.SGD([{"params": ps[:2], "lr": 0.5}, {"params": ps[2:]}], lr=0.1),
}


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_first_update_is_the_one_the_real_step_makes(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = _OPTIMIZERS[name](list(model.parameters()))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    nn.functional.mse_loss(model(x), y).backward()  # one real step first: the optimizer has state
    opt.step()
    opt.zero_grad()
    report = preflight(model, (x, y), nn.functional.mse_loss, optimizer=opt)
    # The copy started from the same weights, optimizer state and batch: its first update is the
    # update the user's own next step makes.
    def flat(m: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    before = {"0": flat(model[0]), "2": flat(model[2])}
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    for n, w0 in before.items():
        expected = float((flat(model[int(n)]) - w0).norm() / w0.norm())
        assert report.layer(n).update_ratio == pytest.approx(expected, rel=1e-6)


def test_same_call_same_report():
    torch.manual_seed(0)
    model = _Net()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    a = preflight(model, (x, y), nn.functional.cross_entropy)
    b = preflight(model, (x, y), nn.functional.cross_entropy)
    assert a.losses == b.losses and a.layers == b.layers


def test_optimizer_over_foreign_parameters_is_refused():
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^`optimizer` \(SGD\) holds a parameter of shape \(2, 2\) that is not one of "
                                         r"`model`'s; pre-flight copies the model"):
        preflight(model, (torch.randn(4, 2), torch.randn(4, 2)), nn.functional.mse_loss,
                  optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


# ---------------------------------------------------------------------------------------------- figures
def test_rows_against_float64_references():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.0, 0.0, -100.0]))  # unit 2 is dead on every sample
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    lr = 0.1
    report = preflight(model, (x, y), nn.functional.mse_loss, optimizer=torch.optim.SGD(model.parameters(), lr=lr))
    assert [(r.name, r.type) for r in report.layers] == [("0", "Linear"), ("1", "ReLU"), ("2", "Linear")]

    m64 = model.double()
    x64, y64 = x.double(), y.double()
    h = m64[0](x64)
    a = m64[1](h)
    out = m64[2](a)
    nn.functional.mse_loss(out, y64).backward()
    fc0, act, fc2 = report.layers
    for row, ref in ((fc0, h), (act, a), (fc2, out)):
        assert row.output_rms == pytest.approx(float(ref.detach().square().mean().sqrt()), rel=1e-6)
        assert row.output_finite
    for row, mod in ((fc0, m64[0]), (fc2, m64[2])):
        g = torch.cat([mod.weight.grad.reshape(-1), mod.bias.grad.reshape(-1)])
        w = torch.cat([mod.weight.reshape(-1), mod.bias.reshape(-1)]).detach()
        assert row.grad_norm == pytest.approx(float(g.norm()), rel=1e-5)
        assert row.grad_to_param == pytest.approx(float(g.norm() / w.norm()), rel=1e-5)
        assert row.update_ratio == pytest.approx(lr * float(g.norm() / w.norm()), rel=1e-4)  # SGD: ||lr g|| / ||w||
        assert row.init_std == pytest.approx(float(mod.weight.detach().std()), rel=1e-6)
        assert row.init_expected == pytest.approx(math.sqrt(2.0 / mod.in_features))  # He: the model has a ReLU
        assert row.init_scheme == "He"
    assert act.dead == pytest.approx(1 / 3) and act.saturated is None and act.grad_norm is None
    assert fc0.dead is None and fc0.time_ratio is None
    assert report.input_rms == pytest.approx(float(x.double().square().mean().sqrt()), rel=1e-6)
    assert report.batch_size == 16 and report.steps == 3


def test_saturation_and_xavier_scheme():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.fill_(10.0)
    x = torch.ones(5, 4)
    report = preflight(model, (x, torch.zeros(5, 1)), nn.functional.mse_loss)
    tanh = report.layer("1")
    assert tanh.saturated == 1.0 and tanh.dead is None
    # Xavier with tanh's gain (5/3): fan_in 8, fan_out 1.
    assert report.layer("2").init_expected == pytest.approx(5 / 3 * math.sqrt(2.0 / 9))
    assert report.layer("2").init_scheme == "Xavier"
    # 100% of the tanh outputs pinned, so almost no gradient below them: the cause is listed first.
    assert [(a.kind, a.layer) for a in report.alerts] == [("saturated", "1"), ("vanishing", "0")]
    with pytest.raises(KeyError, match=r"^\"no layer 'x' in this report; layers: 0, 1, 2\"$"):
        report.layer("x")


def test_time_profile_of_recurrent_layers():
    sc = SCENARIOS["recurrence"]
    report = _scenario_run(sc, sc.variant("rnn"))
    row = report.layer("rnn")
    assert row.type == "RNN" and row.time_ratio is not None and row.time_ratio < 1e-8
    assert report.alerts[0].message.startswith("Vanishing gradients across time at step 0: in rnn the first time step")


# ---------------------------------------------------------------------------------------------- findings
class _UnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 4)
        self.aux = nn.Linear(4, 4)  # built, never called
        self.frozen = nn.Linear(4, 4).requires_grad_(False)  # never called either, but frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_layer_the_loss_never_reaches():
    model = _UnusedHead()
    data = (torch.randn(8, 8), torch.randn(8, 4))
    report = preflight(model, data, nn.functional.mse_loss)
    (alert,) = report.alerts
    # The monitor's NoGradient with a window of all the pre-flight steps: none of the 3 reached `aux`.
    assert (alert.kind, alert.step, alert.layer, alert.value) == ("no_gradient", 2, "aux", 3.0)
    assert alert.message == (
        "No gradient at step 2: aux got none for 3 steps (since step 0) while the other layers did: "
        "the loss never reaches it."
    )
    assert alert.remedies[0].startswith("`aux` never reaches the loss: call it in forward()")
    assert report.layer("aux").grad_norm is None and report.layer("aux").output_rms is None
    # Left out of the optimizer: not trained, so not a finding.
    opt = torch.optim.SGD(model.body.parameters(), lr=0.01)
    assert preflight(model, data, nn.functional.mse_loss, optimizer=opt).ok


def test_fast_explosion_names_the_cause_before_the_inf():
    # 20 ReLU layers at 3x the He std: the total norm is ~1e10 at step 0 and one SGD step later it is Inf.
    torch.manual_seed(0)
    model = _models_mlp(20, 64, nn.ReLU, init=lambda w: nn.init.normal_(w, std=3 * math.sqrt(2 / w.shape[1])))
    x = torch.randn(64, 32)
    y = (x[:, 0] > 0).long()
    report = preflight(model, (x, y), nn.functional.cross_entropy, optimizer=torch.optim.SGD(model.parameters(), 0.01))
    # After the first (huge) update: Inf in the gradients, and the ReLUs behind the exploded layers dead.
    assert [(a.kind, a.step) for a in report.alerts] == [("exploding", 0), ("nonfinite", 1), ("dead", 1)]
    assert report.alerts[0].remedies[0].startswith("Initialise ")  # the oversized init, not the numerics
    # No divergence finding on top: the gradients already explained it, with their own remedies.
    assert not any(a.message.startswith("Divergence") for a in report.alerts)


class _LogOfNegative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fc(x) - 100.0)


def test_nonfinite_output_and_gradients():
    report = preflight(_LogOfNegative(), (torch.randn(4, 4), torch.zeros(4, 4)), nn.functional.mse_loss)
    assert report.kinds == ["nonfinite"]
    assert report.alerts[0].severity == "error" and report.alerts[0].step == 0
    assert math.isnan(report.losses[0])


def test_zero_init_adapter_blocking_a_gradient_is_a_transient():
    # LoRA's B = 0 keeps A's gradient exactly zero until B's first update: not a finding.
    model = HEALTHY["lora_zero_init_adapter"][0]()
    report = preflight(model, (torch.randn(8, 32), torch.randint(0, 10, (8,))), nn.functional.cross_entropy)
    assert report.layer("lora_a").grad_norm == 0.0
    assert report.ok


# ---------------------------------------------------------------------------------------------- batches
class _OwnLoss(nn.Module):
    def __init__(self, shape: str) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.shape = shape

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        out = self.fc(x)
        loss = nn.functional.mse_loss(out, labels if labels is not None else torch.zeros_like(out))
        if self.shape == "scalar":
            return loss
        if self.shape == "dict":
            return {"loss": loss, "logits": out}
        return type("Output", (), {"loss": loss, "logits": out})()


@pytest.mark.parametrize("shape", ["scalar", "dict", "attribute"])
def test_model_that_returns_its_loss(shape):
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    torch.manual_seed(0)
    model = _OwnLoss(shape)
    expected = float(nn.functional.mse_loss(model.fc(x), y).detach())
    assert preflight(model, {"x": x, "labels": y}).losses[0] == pytest.approx(expected)
    assert preflight(model, (x, y)).losses[0] == pytest.approx(expected)  # model(*batch) without loss_fn
    assert preflight(model, x).losses[0] == pytest.approx(float(nn.functional.mse_loss(model.fc(x), 0 * y).detach()))


def test_batch_conventions_with_loss_fn():
    torch.manual_seed(0)
    auto = nn.Linear(3, 3)
    x = torch.randn(5, 3)
    seen = []

    def recon(out, target):
        seen.append(target)
        return nn.functional.mse_loss(out, target)

    report = preflight(auto, x, recon, steps=1)  # a tensor: loss_fn(model(x), x)
    assert seen == [x] and report.losses[0] == pytest.approx(float(nn.functional.mse_loss(auto(x), x)))

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, a, b):
            return self.fc(a) + self.fc(b)

    two = Two()
    y = torch.randn(5, 1)
    report = preflight(two, (x, 2 * x, y), nn.functional.mse_loss, steps=1)  # (*inputs, target)
    assert report.losses[0] == pytest.approx(float(nn.functional.mse_loss(two(x, 2 * x), y)))
    got = []
    preflight(_OwnLoss("dict"), {"x": x, "labels": y}, lambda out, b: got.append(b) or out["loss"], steps=1)
    assert got[0]["labels"] is y  # a dict: loss_fn(model(**batch), batch)


def test_bad_arguments_are_named():
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"^`batch` must be a Tensor, a tuple or list \(\*inputs, target\), or a dict "
                                        r"of keyword inputs; got str$"):
        preflight(model, "x", nn.functional.mse_loss)
    with pytest.raises(ValueError, match=r"^`batch` as a tuple or list is \(\*inputs, target\) when `loss_fn` is "
                                         r"given, so it needs at least 2 elements; got 1$"):
        preflight(model, (x,), nn.functional.mse_loss)
    with pytest.raises(ValueError, match=r"^`steps` must be an int >= 1; got 0$"):
        preflight(model, x, nn.functional.mse_loss, steps=0)
    with pytest.raises(ValueError, match=r"^`loss_fn` is needed: the model's output \(a Tensor of shape \(4, 1\)\) "
                                         r"carries no loss"):
        preflight(model, x)
    with pytest.raises(TypeError, match=r"^`model` must be a torch.nn.Module; got function$"):
        preflight(lambda t: t, x, nn.functional.mse_loss)
    with pytest.raises(TypeError, match=r"^`loss_fn` must be None or a callable"):
        preflight(model, x, "mse")
    with pytest.raises(TypeError, match=r"^`optimizer` must be None or a torch.optim.Optimizer; got str$"):
        preflight(model, (x, x[:, :1]), nn.functional.mse_loss, optimizer="adam")


# ---------------------------------------------------------------------------------------------- printing
def test_printed_table():
    rows = [
        LayerRow("0", "Linear", 1.2, True, 3e-18, 1e-18, 0.1, 0.25, "He"),
        LayerRow("1", "Sigmoid", 0.5, True, saturated=0.25),
        LayerRow("2", "Linear", 0.4, True, 0.5, 0.2, 0.25, 0.25, "He", update_ratio=0.01),
    ]
    alert = gw.Alert("vanishing", 0, "0", 1e-17, 1e-4, "warning", "Vanishing gradients at step 0.",
                     ("Fix A.", "B.", "C."))
    report = PreflightReport("Net", 3, 64, 1.0, [2.0, 1.5, 1.25], rows, [alert], "Adam(lr=0.001)")
    assert str(report) == "\n".join([
        "gradwatch pre-flight: Net, 3 step(s) on a batch of 64 with Adam(lr=0.001): 1 finding",
        "  input rms 1; loss 2 -> 1.5 -> 1.25; forward signal 1.2 -> 0.4 over 2 weight layers (x0.333 per layer)",
        "  worst layers (forward order):",
        "    layer  type     out rms  grad norm  grad/w   init x  dead/sat  upd/w",
        "    0      Linear   1.2      3.0e-18    1.0e-18  0.4 He  -         -",
        "    1      Sigmoid  0.5      -          -        -       25%       -",
        "    2      Linear   0.4      0.5        0.2      1 He    -         0.01",
        "  [warning] vanishing: Vanishing gradients at step 0.",
        "      1. Fix A.",
        "      2. B.",
    ])
    assert not report.ok and report.kinds == ["vanishing"]
    ok = PreflightReport("Net", 1, None, None, [0.5], [], [], None)
    assert str(ok) == "gradwatch pre-flight: Net, 1 step(s): ok\n  integer inputs; loss 0.5"


def test_transformer_and_resnet_reports_print_ok():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for build, task in ((PreLNTransformer, "tok"), (SmallResNet, "img")):
        x, y = batch(task, gen)
        report = preflight(build(), (x, y), lambda out, t, task=task: loss_of(task, out, t))
        text = str(report)
        assert text.splitlines()[0] == f"gradwatch pre-flight: {build.__name__}, 3 step(s) on a batch of {len(x)}: ok"
        assert "worst layers (forward order; " in text


# ---------------------------------------------------------------------------------------------- Lightning
def _fit(pl, module, callback, batches=6):
    from lightning_helpers import loader, make_logger_class, trainer_kwargs

    logger = make_logger_class(pl)()
    trainer = pl.Trainer(callbacks=[callback], logger=logger, limit_train_batches=batches, **trainer_kwargs())
    trainer.fit(module, loader())
    return trainer, logger


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_preflight_on_the_first_batch_changes_nothing(package, capsys):
    from lightning_helpers import make_module_class, pl_package

    from gradwatch.lightning import GradWatchCallback

    pl = pl_package(package)
    runs = []
    for flag in (False, True):
        torch.manual_seed(0)
        module = make_module_class(pl)(depth=10, width=32, act="sigmoid")
        cb = GradWatchCallback(preflight=flag, log_every=1, sinks=[], on_alert="ignore")
        _, logger = _fit(pl, module, cb)
        runs.append((cb, logger.gradwatch_records(), [p.detach().clone() for p in module.parameters()]))
    (plain, rec0, w0), (checked, rec1, w1) = runs
    assert plain.preflight_report is None
    report = checked.preflight_report
    assert [(a.kind, a.step, a.layer) for a in report.alerts] == [("vanishing", 0, "net.0")]
    assert report.optimizer == "SGD(lr=0.05)" and report.batch_size == 4 and len(report.losses) == 3
    # The fit itself is exactly the fit without pre-flight: same records, same weights, bit for bit.
    assert rec1 == rec0
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    out = capsys.readouterr().out
    assert "gradwatch pre-flight: Net, 3 step(s) on a batch of 4 with SGD(lr=0.05): 1 finding" in out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_preflight_raise_stops_before_the_first_step():
    from lightning_helpers import make_module_class, pl_package

    from gradwatch.lightning import GradWatchCallback

    pl = pl_package()
    torch.manual_seed(0)
    module = make_module_class(pl)(depth=10, width=32, act="sigmoid")
    before = [p.detach().clone() for p in module.parameters()]
    cb = GradWatchCallback(preflight=True, on_alert="raise", sinks=[])
    with pytest.raises(gw.GradWatchAlertError, match=r"^Vanishing gradients along depth at step 0"):
        _fit(pl, module, cb)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert cb.monitor.step_count == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_preflight_healthy_module_is_ok(capsys):
    from lightning_helpers import make_module_class, pl_package

    from gradwatch.lightning import GradWatchCallback

    pl = pl_package()
    torch.manual_seed(0)
    cb = GradWatchCallback(preflight=True, sinks=[])
    _fit(pl, make_module_class(pl)(), cb, batches=2)
    assert cb.preflight_report.ok
    assert "gradwatch pre-flight: Net, 3 step(s) on a batch of 4 with SGD(lr=0.05): ok" in capsys.readouterr().out


def test_lightning_preflight_option_is_checked():
    from gradwatch.lightning import GradWatchCallback

    with pytest.raises(ValueError, match=r"^`preflight` must be True or False; got 1$"):
        GradWatchCallback(preflight=1)
    assert GradWatchCallback(preflight=True).state_key == GradWatchCallback().state_key


def test_lightning_preflight_that_cannot_run_warns_and_training_goes_on():
    from lightning_helpers import make_module_class, pl_package

    from gradwatch.lightning import GradWatchCallback

    pl = pl_package()
    torch.manual_seed(0)
    module = make_module_class(pl)(nan_at=100)  # its training_step reads self.trainer: the copy has none
    cb = GradWatchCallback(preflight=True, sinks=[])
    message = (
        r"^gradwatch pre-flight could not run on the first batch \(RuntimeError: make_module_class.<locals>.Net "
        r"is not attached to a `Trainer`\.\); training goes on without it$"
    )
    with pytest.warns(gw.GradWatchWarning, match=message):
        _fit(pl, module, cb, batches=2)
    assert cb.preflight_report is None
    assert cb.monitor.step_count == 2
