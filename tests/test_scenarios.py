"""Calibration: pathological trainings are flagged with the right kind and remedy within 30
steps; healthy trainings raise no alert at all over 150 steps."""

from __future__ import annotations

import math

import pytest
import torch
from _models import GRURegressor, PreLNTransformer, SmallResNet, he, mlp, train, xavier_tanh
from torch import nn

import gradwatch as gw


def _kinds(monitor) -> list[str]:
    return [a.kind for a in monitor.alerts]


def test_deep_sigmoid_mlp_vanishes_and_suggests_relu():
    torch.manual_seed(0)
    monitor, _ = train(mlp(20, 128, nn.Sigmoid), "cls", 30)
    first = monitor.alerts[0]
    assert first.kind == "vanishing"
    assert first.step == 2  # the condition must hold 3 consecutive steps: 0, 1, 2
    assert first.layer == "0"  # the first Linear, in forward order
    assert first.value < 1e-10
    assert first.remedies[0].startswith("Replace the sigmoid activations `1`, `3`, `5`, `7` (and 16 more, 20 in all)")
    assert "nn.ReLU or nn.LeakyReLU" in first.remedies[0]
    assert first.message.startswith("Vanishing gradients along depth at step 2: the earliest layers (from 0) get ")


def test_default_init_deep_relu_vanishes_and_suggests_he_init():
    torch.manual_seed(0)
    monitor, _ = train(mlp(20, 128, nn.ReLU), "cls", 30)
    first = monitor.alerts[0]
    assert (first.kind, first.step, first.layer) == ("vanishing", 2, "0")
    assert 1e-9 < first.value < 1e-4
    assert first.remedies[0].startswith("Initialise `0`, `2`, `4`, `6`")
    assert "He init (nn.init.kaiming_normal_(w, nonlinearity='relu'))" in first.remedies[0]
    assert "0.41x the He value" in first.remedies[0]  # PyTorch's default is kaiming_uniform(a=sqrt(5))


def test_oversized_init_explodes_and_suggests_reinit_then_clipping():
    torch.manual_seed(0)
    model = mlp(8, 128, nn.ReLU, init=lambda w: nn.init.normal_(w, std=4 * math.sqrt(2 / w.shape[1])))
    monitor, _ = train(model, "cls", 30)
    first = monitor.alerts[0]
    assert first.kind == "exploding"
    assert first.step <= 5
    assert first.value > 50
    assert first.remedies[0].startswith("Initialise ")
    assert "He init" in first.remedies[0] and "amplifies the signal" in first.remedies[0]
    assert first.remedies[1].startswith("Clip gradients: gw.clip.Norm(max_norm=")


def test_nan_mid_training_is_flagged_at_its_step_and_skipped():
    torch.manual_seed(0)
    model = mlp(4, 64, nn.ReLU, init=he)

    def poison(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == 15 else loss

    monitor, _ = train(model, "cls", 30, loss_hook=poison)
    assert _kinds(monitor) == ["nonfinite"]
    alert = monitor.alerts[0]
    assert alert.step == 15 and alert.severity == "error"
    assert alert.layer == "8"  # the head: first in backward order
    assert alert.message == (
        "Non-finite gradients (NaN/Inf) at step 15 in 5 layer(s), first in backward order: 8, 6, 4 and 2 more. "
        "The step was skipped: no weight or optimizer state changed."
    )
    assert "log(0)" in alert.remedies[0]
    assert monitor.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sudden_loss_spike_is_flagged_at_its_step():
    torch.manual_seed(0)

    def spike(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * 1000.0 if step == 25 else loss

    monitor, _ = train(mlp(4, 64, nn.ReLU, init=he), "cls", 30, loss_hook=spike)
    assert _kinds(monitor) == ["spike"]
    alert = monitor.alerts[0]
    assert alert.step == 25 and alert.layer is None
    assert 300 < alert.value < 3000  # the norm jumped ~1000x its running mean
    assert alert.remedies[0].startswith("Clip gradients: gw.clip.Norm(max_norm=")
    assert "gw.clip.ZScore()" in alert.remedies[0]


def test_dead_relus_are_flagged_with_leaky_relu_remedy():
    torch.manual_seed(0)
    model = mlp(4, 64, nn.ReLU, init=he, bias_fill=-10.0)  # every pre-activation starts far below 0
    monitor, _ = train(model, "cls", 30, track_activations=True)
    dead = [a for a in monitor.alerts if a.kind == "dead"]
    assert len(dead) == 1
    assert dead[0].step == 2 and dead[0].value == 1.0 and dead[0].layer == "1"
    assert dead[0].message == (
        "Dead units at step 2: 100% of the units of 1 (and 3 more) output zero on every sample."
    )
    # The cause is the bias init (issue 11: remedies follow the evidence): zero biases first, LeakyReLU next.
    assert dead[0].remedies[0].startswith("Initialise the biases of `0`, `2`, `4`, `6` to zero (nn.init.zeros_")
    assert "they start at -10, 7.1 pre-activation stds below zero" in dead[0].remedies[0]
    assert dead[0].remedies[1].startswith("Replace `1`, `3`, `5`, `7` with nn.LeakyReLU(0.01) or nn.GELU")
    # With every ReLU dead, no gradient reaches the hidden layers either.
    assert [a.kind for a in monitor.alerts if a.kind != "dead"] == ["vanishing"]


def test_all_zero_init_is_flagged_with_never_zero_remedy():
    monitor, _ = train(mlp(6, 64, nn.ReLU, init=nn.init.zeros_), "cls", 30)
    first = monitor.alerts[0]
    assert (first.kind, first.step) == ("vanishing", 2)
    assert first.remedies[0].startswith("Never initialise weights to zero: `0`, `2`, `4`, `6` (and 3 more, 7 in all)")


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class _LoRA(nn.Module):
    """A frozen base with a zero-initialised low-rank adapter (B = 0), as LoRA does."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(32, 64)
        self.base.requires_grad_(False)
        self.lora_a = nn.Linear(32, 4, bias=False)
        self.lora_b = nn.Linear(4, 64, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.base(x) + self.lora_b(self.lora_a(x))))


HEALTHY = {
    "he_relu_mlp": (lambda: mlp(16, 128, nn.ReLU, init=he), "cls", True),
    "xavier_tanh_mlp": (lambda: mlp(10, 128, nn.Tanh, init=xavier_tanh), "cls", True),
    "pre_ln_transformer": (PreLNTransformer, "tok", False),
    "resnet_batchnorm": (SmallResNet, "img", True),
    "gru_short_sequences": (GRURegressor, "seq", False),
    "shallow_mlp": (lambda: mlp(2, 64, nn.ReLU), "cls", True),
    "cnn_without_norm": (_CNN, "img", True),
    "lora_zero_init_adapter": (_LoRA, "cls", False),
}


@pytest.mark.parametrize("name", list(HEALTHY), ids=list(HEALTHY))
def test_healthy_training_raises_no_alert(name):
    build, task, track = HEALTHY[name]
    torch.manual_seed(0)
    monitor, losses = train(build(), task, 150, track_activations=track)
    assert monitor.alerts == []
    assert sum(losses[-10:]) < sum(losses[:10])  # it did learn: a silent monitor on a broken run proves nothing


def test_slow_divergence_with_growing_weights_is_flagged_by_growth():
    # Gradients and weights grow together (1.4x per step from step 25): ||g||/||w|| stays at 0.3
    # and no single step is a spike; only the growth over the early level shows the divergence.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=1)
    base = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for t in range(80):
        factor = 1.4 ** max(0, t - 25)
        noise = 1 + 0.1 * torch.randn((), generator=gen).item()
        with torch.no_grad():
            for p, w in zip(model.parameters(), base):
                p.copy_(w * factor)
                p.grad = 0.3 * w * factor * noise
        monitor.step()
    assert [(a.kind, a.step) for a in monitor.alerts] == [("exploding", 55)]  # 1.4^28 > 1e4, held 3 steps
    alert = monitor.alerts[0]
    assert 1e4 < alert.value < 1e5 and alert.layer is None
    assert alert.message.startswith("Exploding gradients at step 55: the total gradient norm has grown to ")
    assert alert.message.endswith("x its level over the first 20 steps (threshold 1.00e+04).")
