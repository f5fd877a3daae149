"""GradWatchCallback inside real Lightning Trainers (CPU, tiny models), for both Lightning packages."""

from __future__ import annotations

import csv
import importlib
import warnings
from pathlib import Path

import pytest
import torch
from lightning_helpers import PACKAGES, loader, make_logger_class, make_module_class, pl_package, trainer_kwargs

import gradwatch as gw
from gradwatch.lightning import GradWatchCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(params=PACKAGES, ids=["lightning.pytorch", "pytorch_lightning"])
def pl(request):
    return pl_package(request.param)


def fit(pl, module, callback, *, logger=None, batches=16, **kw):
    logger = logger if logger is not None else make_logger_class(pl)()
    trainer = pl.Trainer(callbacks=[callback], logger=logger, limit_train_batches=batches, **trainer_kwargs(**kw))
    trainer.fit(module, loader())
    return trainer, logger


def test_one_record_per_optimizer_step_with_accumulation(pl):
    torch.manual_seed(0)
    module = make_module_class(pl)()
    cb = GradWatchCallback(log_every=1)
    _, logger = fit(pl, module, cb, accumulate_grad_batches=4)
    records = logger.gradwatch_records()
    # 16 micro-batches / 4 = 4 optimizer steps, numbered as trainer.global_step
    assert [s for s, _ in records] == [0, 1, 2, 3]
    assert [s for s, _ in module.seen] == [0, 1, 2, 3]
    for (step, m), (_, ref) in zip(records, module.seen):
        assert m["grad_norm/total"] == pytest.approx(ref, rel=1e-5), step
    assert cb.monitor.step_count == 4
    # every logging step carries the per-layer families of the contract
    assert {"grad_norm/net.0", "grad_norm/net.2", "grad_norm/net.4"} <= set(records[0][1])
    assert records[0][1]["skipped_steps"] == 0.0


def test_log_every_counts_optimizer_steps(pl):
    module = make_module_class(pl)()
    cb = GradWatchCallback(log_every=3)
    _, logger = fit(pl, module, cb, accumulate_grad_batches=2, batches=16)
    assert [s for s, _ in logger.gradwatch_records()] == [0, 3, 6]


def test_reports_pre_clip_norm_with_gradient_clip_val(pl):
    torch.manual_seed(0)
    module = make_module_class(pl)(lr=0.01)
    cb = GradWatchCallback(log_every=1)
    _, logger = fit(pl, module, cb, batches=4, gradient_clip_val=0.01)
    logged = [m["grad_norm/total"] for _, m in logger.gradwatch_records()]
    seen = [n for _, n in module.seen]
    applied = [n for _, n in module.after]
    assert len(logged) == 4
    assert logged == pytest.approx(seen, rel=1e-5)
    assert min(logged) > 0.05  # far above the clip value: Lightning clipped after gradwatch read them
    assert max(applied) <= 0.01 * (1 + 1e-4)


def test_gradwatch_clip_inside_lightning(pl):
    torch.manual_seed(0)
    module = make_module_class(pl)(lr=0.01)
    cb = GradWatchCallback(log_every=1, clip=gw.clip.Norm(0.02))
    _, logger = fit(pl, module, cb, batches=4)
    recs = [m for _, m in logger.gradwatch_records()]
    # the module's own hook runs after the callback: it sees the clipped gradients
    seen = [n for _, n in module.seen]
    assert [m["grad_norm_clipped/total"] for m in recs] == pytest.approx(seen, rel=1e-4)
    assert all(m["grad_norm/total"] > 0.02 for m in recs)
    assert seen == pytest.approx([0.02] * 4, rel=1e-4)
    assert [m["clip/coef"] for m in recs] == pytest.approx([0.02 / m["grad_norm/total"] for m in recs], rel=1e-4)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_nan_step_is_skipped_and_leaves_weights_unchanged(pl, opt):
    torch.manual_seed(0)
    module = make_module_class(pl)(opt=opt, nan_at=2)
    cb = GradWatchCallback(log_every=1, on_alert="ignore")
    # with Adam, Lightning's own clipping also runs on the (absent) gradients of the skipped step
    _, logger = fit(pl, module, cb, batches=5, gradient_clip_val=0.5 if opt == "adam" else None)
    before2, before3, before4 = (module.snapshots[f"before{k}"] for k in (2, 3, 4))
    # global_step still advances past the skipped step (a skipped step counts as a step)
    assert all(torch.equal(a, b) for a, b in zip(before2, before3))
    assert not any(torch.equal(a, b) for a, b in zip(before3, before4))  # the next step updates normally
    s2, s3 = module.opt_states["before2"], module.opt_states["before3"]
    assert _state_equal(s2, s3)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    recs = dict(logger.gradwatch_records())
    assert recs[2]["skipped_steps"] == 1.0 and recs[1]["skipped_steps"] == 0.0 and recs[4]["skipped_steps"] == 1.0
    assert recs[2]["nonfinite/total"] > 0
    nonfinite = [a for a in cb.monitor.alerts if a.kind == "nonfinite"]
    assert [a.step for a in nonfinite] == [2]
    assert "The step was skipped" in nonfinite[0].message
    assert cb.monitor.skipped_steps == 1


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_from_checkpoint_restores_state(pl, tmp_path):
    torch.manual_seed(0)
    Net = make_module_class(pl)
    cfg = dict(log_every=1, on_alert="ignore")
    cb1 = GradWatchCallback(**cfg)
    module = Net(depth=10, width=32, act="sigmoid")
    trainer1, _ = fit(pl, module, cb1, batches=6, max_epochs=1)
    first = [(a.kind, a.step) for a in cb1.monitor.alerts]
    assert ("vanishing", 2) in first  # the deep sigmoid stack's gradients vanish
    ckpt = tmp_path / "run.ckpt"
    trainer1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][cb1.state_key]["monitor"]
    assert saved["step"] == 6

    cb2 = GradWatchCallback(**cfg)
    assert cb2.state_key == cb1.state_key
    logger2 = make_logger_class(pl)()
    trainer2 = pl.Trainer(callbacks=[cb2], logger=logger2, limit_train_batches=6, **trainer_kwargs(max_epochs=2))
    trainer2.fit(Net(depth=10, width=32, act="sigmoid"), loader(), ckpt_path=ckpt)
    assert [s for s, _ in logger2.gradwatch_records()] == [6, 7, 8, 9, 10, 11]
    # alerts and de-duplication state came back: the persisting vanishing condition is not re-announced
    assert [(a.kind, a.step) for a in cb2.monitor.alerts] == first
    assert cb2.monitor.step_count == 12
    # detector state was carried over, not re-warmed: equal to an uninterrupted run's after step 11
    torch.manual_seed(0)
    cb3 = GradWatchCallback(**cfg)
    _, logger3 = fit(pl, Net(depth=10, width=32, act="sigmoid"), cb3, batches=6, max_epochs=2)
    assert [(a.kind, a.step) for a in cb3.monitor.alerts] == first
    _assert_close_state(cb2.monitor.state_dict()["detectors"], cb3.monitor.state_dict()["detectors"])
    for (s2, m2), (s3, m3) in zip(logger2.gradwatch_records(), logger3.gradwatch_records()[6:]):
        assert s2 == s3 and m2["grad_norm/total"] == pytest.approx(m3["grad_norm/total"], rel=1e-5)


def _assert_close_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close_state(x, y)
    else:
        assert a == b


def test_state_key_comes_from_the_configuration():
    a = GradWatchCallback(log_every=5, clip=gw.clip.Norm(1.0))
    b = GradWatchCallback(log_every=5, clip=gw.clip.Norm(1.0), sinks=[])
    c = GradWatchCallback(log_every=10, clip=gw.clip.Norm(1.0))
    assert a.state_key == b.state_key
    assert a.state_key != c.state_key
    assert a.state_key == "GradWatchCallback{'clip': 'Norm(max_norm=1, norm_type=2)', 'log_every': 5}"
    # detectors without a __repr__ are named by class, so the key is the same in a new process
    d1 = GradWatchCallback(detectors=[gw.Vanishing(), gw.Spike()])
    d2 = GradWatchCallback(detectors=[gw.Vanishing(), gw.Spike()])
    assert d1.state_key == d2.state_key == "GradWatchCallback{'detectors': '[Vanishing, Spike]'}"


def test_several_optimizers_one_record_per_optimizer_step(pl):
    class TwoOpt(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt_a, opt_b = self.optimizers()
            for opt in (opt_a, opt_b):
                loss = torch.nn.functional.mse_loss(self.b(torch.tanh(self.a(x))), y)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()

        def on_before_optimizer_step(self, optimizer):
            self.seen.append(self.trainer.global_step)

        def configure_optimizers(self):
            return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

    module = TwoOpt()
    cb = GradWatchCallback(log_every=1)
    _, logger = fit(pl, module, cb, batches=3)
    assert [s for s, _ in logger.gradwatch_records()] == [0, 1, 2, 3, 4, 5]
    assert module.seen == [0, 1, 2, 3, 4, 5]


def test_fused_optimizer_under_amp_is_unscaled(pl):
    torch.manual_seed(0)
    scale = 1024.0
    plugins = importlib.import_module(pl.__name__ + ".plugins")
    module = make_module_class(pl)(opt="adam", fused=True, lr=1e-3)
    cb = GradWatchCallback(log_every=1)
    precision = plugins.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    _, logger = fit(pl, module, cb, batches=3, plugins=[precision])
    recs = logger.gradwatch_records()
    assert [s for s, _ in recs] == [0, 1, 2]
    # Fused Adam unscales inside its own step: the module still sees gradients times the scale.
    for (_, m), (_, seen) in zip(recs, module.seen):
        assert m["grad_norm/total"] == pytest.approx(seen / scale, rel=1e-4)


def test_non_fused_optimizer_under_amp_sees_unscaled_gradients(pl):
    torch.manual_seed(0)
    plugins = importlib.import_module(pl.__name__ + ".plugins")
    module = make_module_class(pl)(opt="adam", lr=1e-3)
    cb = GradWatchCallback(log_every=1)
    precision = plugins.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    _, logger = fit(pl, module, cb, batches=3, plugins=[precision])
    recs = logger.gradwatch_records()
    assert [m["grad_norm/total"] for _, m in recs] == pytest.approx([n for _, n in module.seen], rel=1e-4)


def test_amp_overflow_is_left_to_the_scaler(pl):
    torch.manual_seed(0)
    plugins = importlib.import_module(pl.__name__ + ".plugins")
    module = make_module_class(pl)(opt="adam", lr=1e-3, nan_at=2)
    cb = GradWatchCallback(log_every=1, on_alert="ignore")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, logger = fit(pl, module, cb, batches=4, plugins=[plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    b2, b3 = module.snapshots["before2"], module.snapshots["before3"]
    assert all(torch.equal(a, b) for a, b in zip(b2, b3))  # the scaler skipped the step
    assert scaler.get_scale() == 512.0  # and halved its scale once
    assert [a.kind for a in cb.monitor.alerts if a.kind == "nonfinite"] == []  # the scaler doing its job
    assert [s for s, _ in logger.gradwatch_records()] == [0, 1, 2, 3]


def test_sinks_none_writes_to_every_logger(pl, tmp_path):
    loggers_mod = importlib.import_module(pl.__name__ + ".loggers")
    csv_logger = loggers_mod.CSVLogger(tmp_path, name="csv", version=0)
    rec = make_logger_class(pl)()
    module = make_module_class(pl)()
    cb = GradWatchCallback(log_every=2)
    trainer = pl.Trainer(callbacks=[cb], logger=[csv_logger, rec], limit_train_batches=6, **trainer_kwargs())
    trainer.fit(module, loader())
    assert [s for s, _ in rec.gradwatch_records()] == [0, 2, 4]
    assert rec.saves >= 3
    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    gw_rows = [r for r in rows if r.get("grad_norm/total")]
    assert [int(r["step"]) for r in gw_rows] == [0, 2, 4]
    for r, (_, m) in zip(gw_rows, rec.gradwatch_records()):
        assert float(r["grad_norm/total"]) == pytest.approx(m["grad_norm/total"], rel=1e-6)
        assert float(r["grad_norm/net.0"]) == pytest.approx(m["grad_norm/net.0"], rel=1e-6)


def test_failing_logger_does_not_stop_training(pl):
    Logger = make_logger_class(pl)
    bad, good = Logger(fail=True), Logger()
    module = make_module_class(pl)()
    cb = GradWatchCallback(log_every=1, sinks=[gw.sinks.LightningLoggers()], on_alert="ignore")
    trainer = pl.Trainer(callbacks=[cb], logger=[bad, good], limit_train_batches=3, **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader())
    assert [s for s, _ in good.gradwatch_records()] == [0, 1, 2]
    msgs = [str(w.message) for w in caught if issubclass(w.category, gw.GradWatchWarning)]
    assert msgs == [
        "gradwatch: RecordingLogger.log_metrics failed (OSError: disk full); the other loggers keep receiving."
    ]


def test_alerts_print_once_through_the_progress_bar(pl, capsys):
    torch.manual_seed(0)
    module = make_module_class(pl)(depth=10, width=32, act="sigmoid")
    cb = GradWatchCallback(log_every=1, on_alert="ignore")
    trainer = pl.Trainer(callbacks=[cb], logger=False, limit_train_batches=4,
                         **trainer_kwargs(enable_progress_bar=True))
    printed: list[str] = []
    bar = trainer.progress_bar_callback
    original = bar.print
    bar.print = lambda *a, **k: (printed.append(" ".join(map(str, a))), original(*a, **k))
    trainer.fit(module, loader())
    expected = [a for a in cb.monitor.alerts if a.kind == "vanishing"]
    assert expected
    vanishing = [p for p in printed if p.startswith("[gradwatch] WARNING vanishing")]
    assert len(vanishing) == len(expected)  # once each, through the bar
    assert vanishing[0] == "\n".join(
        [f"[gradwatch] WARNING vanishing: {expected[0].message}"]
        + [f"    {i}. {r}" for i, r in enumerate(expected[0].remedies, 1)]
    )
    out = capsys.readouterr()
    assert (out.out + out.err).count("[gradwatch] WARNING vanishing") == len(expected)


def test_bad_options_are_rejected():
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) 'log_evry'"):
        GradWatchCallback(log_evry=3)
    with pytest.raises(ValueError, match="`on_nonfinite` must be one of 'skip', 'warn', 'raise', 'ignore'; got 'drop'"):
        GradWatchCallback(on_nonfinite="drop")
    with pytest.raises(ValueError, match="`log_every` must be an integer >= 1; got 0"):
        GradWatchCallback(log_every=0)
    with pytest.raises(TypeError, match="takes the AMP scaler from the Trainer's precision plugin"):
        GradWatchCallback(scaler=torch.amp.GradScaler("cpu"))


def test_callback_is_accepted_by_both_trainers():
    import lightning.pytorch as lp
    import pytorch_lightning as ptl

    cb = GradWatchCallback()
    assert isinstance(cb, lp.Callback) and isinstance(cb, ptl.Callback)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_one_record_per_optimizer_step_from_rank_zero(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from gradwatch.sinks import read_jsonl

    script = Path(__file__).parent / "scripts" / "lightning_ddp.py"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONWARNINGS": "ignore"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in seen] == [2, 2]
    # DDP averaged the gradients: both ranks saw the same norms, 8 micro-batches / 2 = 4 optimizer steps
    assert [s for s, _ in seen[0]["seen"]] == [0, 1, 2, 3]
    assert [n for _, n in seen[0]["seen"]] == pytest.approx([n for _, n in seen[1]["seen"]], rel=1e-6)
    # only rank 0 called the sinks: one record per optimizer step
    assert not (tmp_path / "sink_rank1.jsonl").exists()
    sink = [json.loads(line) for line in (tmp_path / "sink_rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sink] == [0, 1, 2, 3]
    assert [r["grad_norm/total"] for r in sink] == pytest.approx([n for _, n in seen[0]["seen"]], rel=1e-5)
    records = read_jsonl(tmp_path / "gw.jsonl")
    assert [r["type"] for r in records] == ["meta"] + ["metrics"] * 4
    assert [r["step"] for r in records[1:]] == [0, 1, 2, 3]
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("grad_norm/total")] == [0, 1, 2, 3]


def test_the_training_step_loss_reaches_the_monitor(pl):
    """The callback passes the ``training_step`` loss (last micro-batch, undivided) as ``step(loss=...)``."""
    base = make_module_class(pl)

    class Recording(base):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append((self.trainer.global_step, float(loss)))
            return loss

    torch.manual_seed(0)
    module = Recording()
    module.losses = []
    cb = GradWatchCallback(log_every=2)
    _, logger = fit(pl, module, cb, accumulate_grad_batches=2, batches=16)
    last = {}
    for step, value in module.losses:
        last[step] = value  # the last micro-batch of each optimizer step
    records = logger.gradwatch_records()
    assert [s for s, _ in records] == [0, 2, 4, 6]
    for step, m in records:
        assert m["loss"] == pytest.approx(last[step], rel=1e-6), step
