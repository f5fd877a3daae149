"""gw.sinks.TensorBoard: event files read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_helpers import loader, make_module_class, pl_package, sigmoid_stack, train_plain, trainer_kwargs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import gradwatch as gw
from gradwatch.sinks._text import alert_markdown

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def f32(x: float) -> float:
    return float(np.float32(x))


def test_scalars_alerts_and_histograms(tmp_path):
    model = sigmoid_stack()
    sink = gw.sinks.TensorBoard(tmp_path / "tb", histograms=True, histogram_every=2)
    monitor = gw.GradWatch(model, sinks=[sink], log_every=1, grad_max_every=1, param_norm_every=1, on_alert="ignore")
    train_plain(monitor, model, steps=5)
    monitor.close()

    acc = events(tmp_path / "tb")
    tags = acc.Tags()
    history = list(monitor.history)
    # Every metric of every logging step (update ratios start at the second one: they measure an update).
    assert set(tags["scalars"]) == {k for h in history for k in h if k != "step"}
    assert "grad_norm/total" in tags["scalars"] and "grad_to_param/net.20" in tags["scalars"]
    for tag in ("grad_norm/total", "grad_norm/net.0", "grad_max/net.10", "param_norm/net.20", "skipped_steps"):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert got == [(int(h["step"]), f32(h[tag])) for h in history], tag

    # alerts as Markdown text at their step
    alerts = monitor.alerts
    assert ("vanishing", "net.0") in [(a.kind, a.layer) for a in alerts]
    assert texts(acc, "gradwatch/alerts") == [(a.step, alert_markdown(a)) for a in alerts]
    assert "1. " in texts(acc, "gradwatch/alerts")[0][1]
    ((_, meta),) = texts(acc, "gradwatch/meta")
    assert "layers (11)" in meta and "`net.0`" in meta

    # histograms of the log10 per-layer norms every 2 steps
    hists = acc.Histograms("layers/grad_norm_log10")
    assert [h.step for h in hists] == [0, 2, 4]
    for h in hists:
        row = history[h.step]
        vals = [math.log10(v) for k, v in row.items() if k.startswith("grad_norm/") and k != "grad_norm/total"]
        assert h.histogram_value.num == len(vals) == 11
        assert h.histogram_value.min == pytest.approx(min(vals), rel=1e-9)
        assert h.histogram_value.max == pytest.approx(max(vals), rel=1e-9)
    assert [h.step for h in acc.Histograms("layers/grad_to_param_log10")] == [0, 2, 4]


def test_given_writer_is_flushed_not_closed(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path / "own"))
    model = sigmoid_stack()
    monitor = gw.GradWatch(model, sinks=[gw.sinks.TensorBoard(writer=writer)], log_every=2, on_alert="ignore")
    train_plain(monitor, model, steps=3)
    monitor.close()
    writer.add_scalar("user/after_close", 1.5, 7)  # still open: the user owns it
    writer.close()
    acc = events(tmp_path / "own")
    assert [e.step for e in acc.Scalars("grad_norm/total")] == [0, 2]
    assert [(e.step, e.value) for e in acc.Scalars("user/after_close")] == [(7, 1.5)]


def test_lightning_tensorboard_logger_gets_scalars_and_alert_text(tmp_path):
    pl = pl_package("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradwatch.lightning import GradWatchCallback

    torch.manual_seed(0)
    module = make_module_class(pl)(depth=10, width=32, act="sigmoid")
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    cb = GradWatchCallback(log_every=2, on_alert="ignore")
    trainer = pl.Trainer(callbacks=[cb], logger=logger, limit_train_batches=6, **trainer_kwargs())
    trainer.fit(module, loader())
    acc = events(Path(logger.log_dir))
    assert [(e.step, e.value) for e in acc.Scalars("grad_norm/total")] == [
        (int(h["step"]), f32(h["grad_norm/total"])) for h in cb.monitor.history
    ]
    assert [e.step for e in acc.Scalars("grad_norm/total")] == [0, 2, 4]
    assert texts(acc, "gradwatch/alerts") == [(a.step, alert_markdown(a)) for a in cb.monitor.alerts]
    assert cb.monitor.alerts


def test_bad_arguments_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="give either `log_dir` or `writer`, not both"):
        gw.sinks.TensorBoard(tmp_path, writer=SummaryWriter(str(tmp_path / "w")))
    with pytest.raises(ValueError, match="`writer` must be a torch.utils.tensorboard.SummaryWriter; got str"):
        gw.sinks.TensorBoard(writer="runs")
    with pytest.raises(ValueError, match="`histogram_every` must be an integer >= 1; got 0"):
        gw.sinks.TensorBoard(tmp_path, histogram_every=0)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs the `tensorboard` package.*pip install tensorboard"):
        gw.sinks.TensorBoard(tmp_path)
