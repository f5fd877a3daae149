"""Console and JSONL sinks, and the isolation of a failing sink."""

from __future__ import annotations

import io
import json
import warnings

import torch
from torch import nn

import gradwatch as gw
from gradwatch.alerts import Alert


class Recorder:
    """A user-written sink: it implements the public protocol and keeps what it gets."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.alerts: list[Alert] = []
        self.closed = 0

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_alert(self, alert):
        self.alerts.append(alert)

    def close(self):
        self.closed += 1


class Broken:
    def log_metrics(self, metrics, step):
        raise OSError("disk full")

    def log_alert(self, alert):
        raise OSError("disk full")

    def close(self):
        raise OSError("disk full")


def _sigmoid_stack() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def _train(monitor: gw.GradWatch, model: nn.Module, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(torch.randn(8, 16)).square().mean().backward()
        monitor.step()
        opt.step()
        opt.zero_grad()


def test_jsonl_records_are_exact(tmp_path):
    model = _sigmoid_stack()
    path = tmp_path / "deep" / "run.jsonl"  # the folder is created lazily
    monitor = gw.GradWatch(model, sinks=[gw.sinks.JSONL(path)], log_every=2, on_alert="ignore")
    assert not path.parent.exists()
    _train(monitor, model, 4)
    monitor.close()
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON
    meta = records[0]
    expected_meta = {
        "type": "meta",
        "version": gw.__version__,
        "layers": [str(i) for i in range(0, 25, 2)],
        "granularity": "module",
        "log_every": 2,
        "clip": None,
        "model": "Sequential",
    }
    # The record keeps these fields exactly; the monitor may add fields (additions are allowed).
    assert {k: meta.get(k) for k in expected_meta} == expected_meta
    assert [(r["type"], r.get("step")) for r in records[1:]] == [
        ("metrics", 0), ("metrics", 2), ("alert", 2)
    ]
    alert = records[3]
    assert set(alert) == {"type", "kind", "step", "layer", "value", "threshold", "severity", "message", "remedies"}
    assert (alert["kind"], alert["layer"], alert["severity"], alert["threshold"]) == ("vanishing", "0", "warning", 1e-4)
    assert alert["message"] == monitor.alerts[0].message
    assert alert["remedies"] == list(monitor.alerts[0].remedies)
    assert records[1]["metrics"]["grad_norm/total"] == monitor.history[0]["grad_norm/total"]


def test_jsonl_writes_nonfinite_floats_as_strings(tmp_path):
    path = tmp_path / "nan.jsonl"
    sink = gw.sinks.JSONL(path)
    sink.log_metrics({"a": float("nan"), "b": float("inf"), "c": 1.5}, 3)
    sink.close()
    assert path.read_text() == '{"type": "metrics", "step": 3, "metrics": {"a": "nan", "b": "inf", "c": 1.5}}\n'
    back = gw.sinks.read_jsonl(path)[0]["metrics"]
    assert back["b"] == float("inf") and back["a"] != back["a"]


def test_console_prints_summary_and_alert_with_remedies():
    model = _sigmoid_stack()
    out = io.StringIO()
    monitor = gw.GradWatch(model, sinks=[gw.sinks.Console(stream=out, top=2)], log_every=3, on_alert="ignore")
    _train(monitor, model, 4)
    monitor.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[gradwatch] step 0 | grad_norm ")
    assert " | smallest: 0 " in lines[0] and ", 2 " in lines[0] and " | largest: 24 " in lines[0]
    alert = monitor.alerts[0]
    i = lines.index(f"[gradwatch] WARNING vanishing: {alert.message}")
    assert lines[i + 1] == f"    1. {alert.remedies[0]}"
    assert len(lines) == 2 + 1 + len(alert.remedies)  # steps 0 and 3, the alert and its remedies


def test_failing_sink_is_warned_once_and_others_keep_receiving():
    model = _sigmoid_stack()
    rec = Recorder()
    monitor = gw.GradWatch(model, sinks=[Broken(), rec], log_every=1, on_alert="ignore")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(monitor, model, 5)
        monitor.close()
    sink_warnings = [str(w.message) for w in caught if "sink Broken" in str(w.message)]
    assert sink_warnings == [
        "gradwatch: sink Broken.log_metrics failed (OSError: disk full); the other sinks keep receiving."
    ]
    assert [s for s, _ in rec.metrics] == [0, 1, 2, 3, 4]
    assert [a.kind for a in rec.alerts] == ["vanishing"]
    assert rec.closed == 1


def test_sinks_none_means_console(capsys):
    model = nn.Linear(2, 1)
    monitor = gw.GradWatch(model)
    model(torch.randn(3, 2)).sum().backward()
    monitor.step()
    monitor.close()
    assert capsys.readouterr().err.startswith("[gradwatch] step 0 | grad_norm ")
