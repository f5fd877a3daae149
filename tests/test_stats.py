"""Per-layer statistics against an independent float64 reference, on hand-set gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch as gw


class Net(nn.Module):
    """Registration order differs from forward order; one layer never runs; the root owns a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 2)
        self.conv = nn.Conv1d(2, 3, 3)
        self.unused = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) * self.scale[None, :, None]
        return self.head(h.flatten(1))


def _hand_set(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run one forward/backward (records forward order), then overwrite every gradient by hand."""
    model(torch.randn(5, 2, 4, dtype=dtype)).square().sum().backward()
    gen = torch.Generator().manual_seed(7)
    grads = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.startswith("unused"):
            p.grad = None
            continue
        # Spread magnitudes over orders of magnitude so the layers differ clearly.
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 10.0 ** (i - 3)
        p.grad = g.to(dtype)
        grads[name] = p.grad.detach().to(torch.float64)
    return grads


def _reference(model: nn.Module, grads: dict[str, torch.Tensor], groups: dict[str, list[str]]) -> dict[str, float]:
    params = {n: p.detach().to(torch.float64) for n, p in model.named_parameters()}
    ref: dict[str, float] = {}
    total_sq = 0.0
    for layer, names in groups.items():
        g = torch.cat([grads[n].flatten() for n in names])
        w = torch.cat([params[n].flatten() for n in names])
        gn, wn = g.norm().item(), w.norm().item()
        ref[f"grad_norm/{layer}"] = gn
        ref[f"grad_max/{layer}"] = g.abs().max().item()
        ref[f"param_norm/{layer}"] = wn
        ref[f"grad_to_param/{layer}"] = gn / wn
        total_sq += gn**2
    ref["grad_norm/total"] = math.sqrt(total_sq)
    return ref


MODULE_GROUPS = {"(root)": ["scale"], "conv": ["conv.weight", "conv.bias"], "head": ["head.weight", "head.bias"]}
PARAM_GROUPS = {n: [n] for n in ["scale", "conv.weight", "conv.bias", "head.weight", "head.bias"]}


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(torch.float32, 1e-6), (torch.float64, 1e-6), (torch.bfloat16, 1e-5)],
    ids=["float32", "float64", "bfloat16"],
)
@pytest.mark.parametrize("granularity", ["module", "parameter"])
def test_statistics_match_float64_reference(dtype, rtol, granularity):
    torch.manual_seed(0)
    model = Net().to(dtype)
    monitor = gw.GradWatch(model, sinks=[], granularity=granularity, on_alert="ignore")
    grads = _hand_set(model, dtype)
    report = monitor.step()
    groups = MODULE_GROUPS if granularity == "module" else PARAM_GROUPS
    # Forward order: the root (its pre-hook fires first), then conv, then head; `unused` never ran
    # and keeps its registration place after those that ran.
    expected_layers = list(groups) + (["unused"] if granularity == "module" else ["unused.weight", "unused.bias"])
    assert monitor.layers == expected_layers
    ref = _reference(model, grads, groups)
    metrics = report.metrics
    assert metrics is not None
    for key, value in ref.items():
        assert metrics[key] == pytest.approx(value, rel=rtol), key
    # A layer without .grad is skipped, never counted as zero.
    assert not any("unused" in k for k in metrics)
    assert metrics["nonfinite/total"] == 0.0
    assert metrics["skipped_steps"] == 0.0
    monitor.close()


def test_nonfinite_entries_are_counted_per_layer():
    model = Net()
    monitor = gw.GradWatch(model, sinks=[], on_nonfinite="warn", on_alert="ignore")
    _hand_set(model, torch.float32)
    model.conv.weight.grad[0, 0, 0] = float("nan")
    model.conv.weight.grad[1, 0, 2] = float("inf")
    model.head.bias.grad[1] = float("-inf")
    report = monitor.step()
    m = report.metrics
    assert (m["nonfinite/total"], m["nonfinite/conv"], m["nonfinite/head"]) == (3.0, 2.0, 1.0)
    assert "nonfinite/(root)" not in m
    assert math.isnan(m["grad_norm/conv"]) and math.isnan(m["grad_norm/total"])
    assert not report.skipped  # "warn" passes the gradients on
    assert torch.isnan(model.conv.weight.grad[0, 0, 0])
    assert [(a.kind, a.step, a.layer) for a in report.alerts] == [
        ("nonfinite", 0, "head")
    ]
    assert report.alerts[0].message.startswith(
        "Non-finite gradients (NaN/Inf) at step 0 in 2 layer(s), first in backward order: head, conv."
    )
    monitor.close()


def test_logging_steps_and_one_record_per_step(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    path = tmp_path / "run.jsonl"
    monitor = gw.GradWatch(model, sinks=[gw.sinks.JSONL(path)], log_every=3)
    steps_with_metrics = []
    for _ in range(7):
        model(torch.randn(8, 4)).sum().backward()
        report = monitor.step()
        if report.metrics is not None:
            steps_with_metrics.append(report.step)
        model.zero_grad()
    monitor.close()
    assert steps_with_metrics == [0, 3, 6]
    records = gw.sinks.read_jsonl(path)
    assert [r["type"] for r in records] == ["meta", "metrics", "metrics", "metrics"]
    assert [r["step"] for r in records[1:]] == [0, 3, 6]
    assert records[0]["layers"] == ["0", "2"]
    assert [h["step"] for h in monitor.history] == [0.0, 3.0, 6.0]


def test_total_norm_excludes_layers_without_grad_and_zero_grad_counts():
    model = Net()
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore")
    _hand_set(model, torch.float32)
    model.unused.weight.grad = torch.zeros(4, 4)  # present but zero: reported as 0, not skipped
    model.unused.bias.grad = torch.zeros(4)
    m = monitor.step().metrics
    assert m["grad_norm/unused"] == 0.0
    assert m["grad_to_param/unused"] == 0.0
    expected = math.sqrt(sum(m[f"grad_norm/{k}"] ** 2 for k in ("(root)", "conv", "head")))
    assert m["grad_norm/total"] == pytest.approx(expected, rel=1e-6)
    monitor.close()


def test_tied_weights_count_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(x))

    model = Tied()
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore")
    model(torch.tensor([1, 2, 3])).sum().backward()
    m = monitor.step().metrics
    assert monitor.layers == ["emb"]
    assert m["grad_norm/total"] == pytest.approx(model.emb.weight.grad.double().norm().item(), rel=1e-6)
    monitor.close()
