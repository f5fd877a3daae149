"""Host syncs during monitor.step(): zero on non-logging steps with on_nonfinite="warn", exactly
one scalar with "skip", one transfer on logging steps."""

from __future__ import annotations

import pytest
import torch
from _syncs import count_syncs
from torch import nn

import gradwatch as gw


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )


def _run(monitor: gw.GradWatch, model: nn.Module, steps: int) -> list[list[str]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    per_step = []
    for _ in range(steps):
        model(torch.randn(4, 8)).square().mean().backward()
        with count_syncs() as calls:
            monitor.step()
        per_step.append(list(calls))
        opt.step()
        opt.zero_grad()
    return per_step


@pytest.mark.parametrize("track_activations", [False, True], ids=["plain", "activations"])
@pytest.mark.parametrize("clip", [None, "norm"], ids=["noclip", "clipnorm"])
def test_no_sync_on_non_logging_steps_with_warn(track_activations, clip):
    model = _model()
    monitor = gw.GradWatch(
        model,
        sinks=[],
        on_nonfinite="warn",
        log_every=5,
        track_activations=track_activations,
        clip=gw.clip.Norm(1.0) if clip else None,
    )
    per_step = _run(monitor, model, 12)
    for step, calls in enumerate(per_step):
        if step % 5 == 0:
            assert calls == ["tolist"], step  # one transfer of one stacked tensor
        else:
            assert calls == [], step
    monitor.close()


def test_exactly_one_scalar_sync_with_skip():
    model = _model()
    monitor = gw.GradWatch(model, sinks=[], on_nonfinite="skip", log_every=5)
    per_step = _run(monitor, model, 12)
    for step, calls in enumerate(per_step):
        expected = ["__bool__", "tolist"] if step % 5 == 0 else ["__bool__"]
        assert calls == expected, step
    monitor.close()


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def test_no_sync_on_non_logging_steps_with_time_profile():
    torch.manual_seed(0)
    model = _Recurrent()
    monitor = gw.GradWatch(model, sinks=[], on_nonfinite="warn", log_every=4, track_time=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    per_step = []
    for _ in range(9):
        with count_syncs() as fwd_calls:
            loss = model(torch.randn(4, 6, 3)).square().mean()
            loss.backward()
        with count_syncs() as calls:
            monitor.step()
        per_step.append(fwd_calls + calls)
        opt.step()
        opt.zero_grad()
    monitor.close()
    assert [len(c) for c in per_step] == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert per_step[4] == ["tolist"]
