"""Gradient accumulation: one record per optimizer step, describing the accumulated gradient."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw

STEPS, MICRO = 5, 4


def setup() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2))
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(MICRO * 4, 5, generator=gen), torch.randn(MICRO * 4, 2, generator=gen)) for _ in range(STEPS)]
    return model, data


def full_batch_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Independent reference: the full batch's gradient, in float64, on a copy of the model."""
    ref = copy.deepcopy(model).double()
    F.mse_loss(ref(x.double()), y.double()).backward()
    out = {name: math.sqrt(sum(float((p.grad**2).sum()) for p in mod.parameters())) for name, mod in
           ref.named_children() if any(True for _ in mod.parameters())}
    out["total"] = math.sqrt(sum(v**2 for v in out.values()))
    return out


@pytest.mark.parametrize("mode", ["explicit", "watch", "watch_all"])
def test_one_record_per_optimizer_step(mode: str, tmp_path: Path) -> None:
    model, data = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.jsonl"
    kw = {"sinks": [gw.sinks.JSONL(path)], "log_every": 1, "on_alert": "ignore"}
    mon = {"explicit": lambda: gw.GradWatch(model, **kw), "watch": lambda: gw.watch(model, opt, **kw),
           "watch_all": lambda: gw.watch(model, **kw)}[mode]()
    expected = []
    for x, y in data:
        expected.append(full_batch_norms(model, x, y))
        opt.zero_grad()
        for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO)):
            (F.mse_loss(model(xm), ym) / MICRO).backward()  # micro-batches: no monitor call here
        if mode == "explicit":
            mon.step()  # once, right before optimizer.step()
        opt.step()
    mon.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["meta"] + ["metrics"] * STEPS
    metrics = records[1:]
    assert [r["step"] for r in metrics] == list(range(STEPS))
    for r, ref in zip(metrics, expected):
        for name, v in ref.items():
            assert r["metrics"][f"grad_norm/{name}"] == pytest.approx(v, rel=1e-5)
    assert mon.step_count == STEPS
