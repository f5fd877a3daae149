"""gw.sinks.Wandb and Lightning's WandbLogger, offline, read back from the run's ``.wandb`` file."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
import wandb
from lightning_helpers import (
    PACKAGES,
    loader,
    make_module_class,
    pl_package,
    sigmoid_stack,
    train_plain,
    trainer_kwargs,
)
from wandb_reader import find_run_file, read_records, read_run

import gradwatch as gw
from gradwatch.sinks._text import alert_text, alert_title
from gradwatch.sinks.wandb import TABLE_COLUMNS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    yield
    if wandb.run is not None:
        wandb.finish()


def expected_alert_records(alerts: list[gw.Alert], level: str = "WARN") -> list[dict]:
    """The alert records the sink must have written (same-title alerts of one step are numbered)."""
    out, seen = [], {}
    for a in alerts:
        if {"info": 0, "warning": 1, "error": 2}[a.severity] < ["INFO", "WARN", "ERROR"].index(level):
            continue
        title = alert_title(a)
        n = seen[(title, a.step)] = seen.get((title, a.step), 0) + 1
        if n > 1:
            title = f"{title[:63 - len(f' ({n})')]} ({n})"
        lvl = {"info": "INFO", "warning": "WARN", "error": "ERROR"}[a.severity]
        out.append({"title": title, "text": alert_text(a), "level": lvl, "wait_duration": 1000})
    return out


def run_dir(tmp_path):
    return find_run_file(tmp_path).parent


def test_plain_loop_history_alerts_table_and_heatmap(tmp_path):
    run = wandb.init(project="gradwatch-test", mode="offline", dir=tmp_path)
    model = sigmoid_stack()
    monitor = gw.GradWatch(
        model, sinks=[gw.sinks.Wandb(run, chart_every=5)], log_every=1, grad_max_every=1, param_norm_every=1,
        on_alert="ignore",
    )
    train_plain(monitor, model, steps=10)
    monitor.close()
    run.finish()

    path = find_run_file(tmp_path)
    data = read_run(path)
    assert data.exit_code == 0
    metric_rows = [r for r in data.history if "grad_norm/total" in r]
    assert [r["gradwatch/step"] for r in metric_rows] == list(range(10))
    # values are the ones the monitor computed, bit for bit (floats travel as JSON)
    for row, hist in zip(metric_rows, monitor.history):
        for k in ("grad_norm/total", "grad_norm/net.0", "grad_norm/net.20", "grad_max/net.0", "param_norm/net.0"):
            assert row[k] == hist[k], k
        assert row["skipped_steps"] == 0
    assert len([k for k in metric_rows[0] if k.startswith("grad_norm/")]) == 12  # total + 11 layers

    # the alerts of the deep sigmoid stack: vanishing gradients in its first layer
    alerts = monitor.alerts
    assert alerts and all(a.severity in ("warning", "error") for a in alerts)
    assert ("vanishing", "net.0") in [(a.kind, a.layer) for a in alerts]
    assert data.alerts == expected_alert_records(alerts)
    vanishing = next(i for i, a in enumerate(alerts) if a.kind == "vanishing")
    text = data.alerts[vanishing]["text"]
    assert data.alerts[vanishing]["title"] == "gradwatch: vanishing gradients in net.0"
    assert f"Step: {alerts[vanishing].step}" in text and "Layer: net.0" in text
    assert "Remedies, most likely first:\n1. " in text and alerts[vanishing].message in text

    # the table of alerts, logged at close
    (table_row,) = [r for r in data.history if "gradwatch/alerts" in r]
    assert table_row["gradwatch/alerts"]["_type"] == "table-file"
    assert table_row["gradwatch/alerts"]["nrows"] == len(alerts)
    table = json.loads((run_dir(tmp_path) / "files" / table_row["gradwatch/alerts"]["path"]).read_text())
    assert table["columns"] == TABLE_COLUMNS
    assert [row[:4] for row in table["data"]] == [[a.step, a.kind, a.severity, a.layer or ""] for a in alerts]
    assert [row[6] for row in table["data"]] == [a.message for a in alerts]
    assert [row[7] for row in table["data"]] == ["\n".join(a.remedies) for a in alerts]

    # the heatmap at steps 0 and 5 (chart_every=5) and at close (step 9)
    images = [r for r in data.history if "gradwatch/grad_norm_heatmap" in r]
    assert [r["gradwatch/step"] for r in images] == [0, 5, 9]
    img = images[-1]["gradwatch/grad_norm_heatmap"]
    assert img["_type"] == "image-file" and img["format"] == "png" and img["width"] == 800
    assert (run_dir(tmp_path) / "files" / img["path"]).stat().st_size > 1000

    # the monitor's configuration in the run config
    assert data.config["gradwatch"]["log_every"] == 1
    assert data.config["gradwatch"]["num_layers"] == 11
    # the file spans more than one 32 KiB block: records split across the boundary decode
    assert path.stat().st_size > 32 * 1024
    assert len(read_records(path)) > 20


def test_alert_level_filters_wandb_alerts_but_not_the_table(tmp_path):
    run = wandb.init(project="gradwatch-test", mode="offline", dir=tmp_path)
    model = sigmoid_stack()
    sink = gw.sinks.Wandb(run, alert_level="ERROR", chart_every=0)
    monitor = gw.GradWatch(model, sinks=[sink], log_every=1, on_alert="ignore")
    train_plain(monitor, model, steps=4)
    monitor.close()
    run.finish()
    data = read_run(find_run_file(tmp_path))
    assert monitor.alerts and all(a.severity != "error" for a in monitor.alerts)
    assert data.alerts == []
    (table_row,) = [r for r in data.history if "gradwatch/alerts" in r]
    assert table_row["gradwatch/alerts"]["nrows"] == len(monitor.alerts)
    assert not [r for r in data.history if "gradwatch/grad_norm_heatmap" in r]


def test_sink_starts_and_finishes_its_own_run(tmp_path):
    assert wandb.run is None
    model = sigmoid_stack()
    sink = gw.sinks.Wandb(init_kwargs={"project": "gradwatch-test", "dir": str(tmp_path)}, chart_every=None)
    monitor = gw.GradWatch(model, sinks=[sink], log_every=2, on_alert="ignore")
    train_plain(monitor, model, steps=6)
    monitor.close()
    assert wandb.run is None  # finished by the sink
    data = read_run(find_run_file(tmp_path))
    assert [r["gradwatch/step"] for r in data.history if "grad_norm/total" in r] == [0, 2, 4]
    assert data.alerts == expected_alert_records(monitor.alerts)
    assert data.alerts[0]["title"] == "gradwatch: vanishing gradients in net.0"
    # chart_every=None: a single heatmap, at close
    assert [r["gradwatch/step"] for r in data.history if "gradwatch/grad_norm_heatmap" in r] == [4]
    assert data.exit_code == 0


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_wandb_logger_gets_metrics_and_alerts(tmp_path, package):
    pl = pl_package(package)
    WandbLogger = importlib.import_module(package + ".loggers").WandbLogger

    from gradwatch.lightning import GradWatchCallback

    torch.manual_seed(0)
    module = make_module_class(pl)(depth=10, width=32, act="sigmoid")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="gradwatch-test")
    cb = GradWatchCallback(log_every=2, on_alert="ignore")
    trainer = pl.Trainer(callbacks=[cb], logger=logger, limit_train_batches=8, **trainer_kwargs(log_every_n_steps=50))
    trainer.fit(module, loader())
    wandb.finish()

    data = read_run(find_run_file(tmp_path))
    rows = [r for r in data.history if "grad_norm/total" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 2, 4, 6]
    assert [r["grad_norm/total"] for r in rows] == [h["grad_norm/total"] for h in cb.monitor.history]
    assert "gradwatch/step" not in rows[0]  # the WandbLogger owns the axis
    alerts = cb.monitor.alerts
    assert ("vanishing", "net.0") in [(a.kind, a.layer) for a in alerts]
    assert data.alerts == expected_alert_records(alerts)
    (table_row,) = [r for r in data.history if "gradwatch/alerts" in r]
    assert table_row["gradwatch/alerts"]["nrows"] == len(alerts)
    images = [r for r in data.history if "gradwatch/grad_norm_heatmap" in r]
    assert [r["trainer/global_step"] for r in images] == [0, 6]


def test_same_title_at_one_step_is_numbered_and_level_filters(tmp_path):
    run = wandb.init(project="gradwatch-test", mode="offline", dir=tmp_path)
    sink = gw.sinks.Wandb(run, chart_every=0)
    depth = gw.Alert("vanishing", 7, "encoder.3", 1e-9, 1e-4, "warning", "Depth profile: 1e-09.", ("Use ReLU.",))
    ratio = gw.Alert("vanishing", 7, "encoder.3", 1e-10, 1e-8, "warning", "Ratio: 1e-10.", ("Use He init.",))
    info = gw.Alert("dead", 7, "encoder.1", 0.6, 0.5, "info", "60% dead units.", ())
    later = gw.Alert("vanishing", 9, "encoder.3", 1e-9, 1e-4, "warning", "Depth profile again.", ())
    for a in (depth, ratio, info, later):
        sink.log_alert(a)
    sink.close()
    run.finish()
    data = read_run(find_run_file(tmp_path))
    assert [(a["title"], a["level"]) for a in data.alerts] == [
        ("gradwatch: vanishing gradients in encoder.3", "WARN"),
        ("gradwatch: vanishing gradients in encoder.3 (2)", "WARN"),
        ("gradwatch: vanishing gradients in encoder.3", "WARN"),
    ]
    assert data.alerts[1]["text"] == (
        "Ratio: 1e-10.\n\nStep: 7\nLayer: encoder.3\nValue: 1e-10 (threshold 1e-08)\nSeverity: warning\n\n"
        "Remedies, most likely first:\n1. Use He init."
    )
    (table_row,) = [r for r in data.history if "gradwatch/alerts" in r]
    assert table_row["gradwatch/alerts"]["nrows"] == 4  # the info alert is in the table


def test_titles_stay_under_64_characters():
    a = gw.Alert("vanishing", 3, "encoder.3", 1e-9, 1e-4, "warning", "m", ())
    assert alert_title(a) == "gradwatch: vanishing gradients in encoder.3"
    long = gw.Alert("nonfinite", 3, "model.transformer.h.23.attention.self.query_key_value.lora_B", 1.0, 0.0, "error",
                    "m", ())
    t = alert_title(long)
    assert len(t) == 63 and t.startswith("gradwatch: non-finite gradients in ...") and t.endswith("lora_B")
    assert alert_title(gw.Alert("spike", 3, None, 9.0, 6.0, "warning", "m", ())) == "gradwatch: gradient spike"


def test_bad_options_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="`alert_level` must be one of 'INFO', 'WARN', 'ERROR'; got 'LOUD'"):
        gw.sinks.Wandb(alert_level="loud")
    with pytest.raises(ValueError, match="`chart_every` must be an integer >= 0; got -1"):
        gw.sinks.Wandb(chart_every=-1)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs the `wandb` package.*pip install wandb"):
        gw.sinks.Wandb()


def test_heatmap_without_matplotlib_warns_once_and_keeps_logging(tmp_path, monkeypatch):
    run = wandb.init(project="gradwatch-test", mode="offline", dir=tmp_path)
    model = sigmoid_stack()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monitor = gw.GradWatch(model, sinks=[gw.sinks.Wandb(run, chart_every=1)], log_every=1, on_alert="ignore")
    with pytest.warns(gw.GradWatchWarning) as caught:
        train_plain(monitor, model, steps=3)
        monitor.close()
    run.finish()
    msgs = [str(w.message) for w in caught if "heatmap" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("gradwatch: the W&B gradient-norm heatmap needs matplotlib")
    data = read_run(find_run_file(tmp_path))
    assert [r["gradwatch/step"] for r in data.history if "grad_norm/total" in r] == [0, 1, 2]
    assert not [r for r in data.history if "gradwatch/grad_norm_heatmap" in r]
