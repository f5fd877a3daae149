"""Temporal gradient profile of recurrent modules (track_time=True) and the TimeVanishing detector."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.detectors import TimeVanishing
from gradwatch.reference.models import SequenceClassifier
from gradwatch.temporal import TimeProfiler, step_norms


class Seq(nn.Module):
    def __init__(self, cell: type[nn.Module] = nn.RNN, batch_first: bool = True, embed: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4) if embed else None
        self.rnn = cell(4, 6, batch_first=batch_first)
        self.head = nn.Linear(6, 3)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        y, _ = self.rnn(x)
        return self.head(y[:, -1] if self.batch_first else y[-1])


def _reference_profile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, time_dim: int) -> torch.Tensor:
    """Per-step ||dL/dx_t|| computed independently, in float64."""
    m64 = Seq(type(model.rnn), batch_first=model.batch_first).double()
    m64.load_state_dict(model.state_dict())
    x64 = x.double().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(m64(x64), y)
    (g,) = torch.autograd.grad(loss, x64)
    return g.movedim(time_dim, 0).reshape(g.shape[time_dim], -1).norm(dim=1)


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU], ids=["rnn", "lstm", "gru"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_ratio_and_decay_match_float64_reference(cell: type[nn.Module], batch_first: bool) -> None:
    torch.manual_seed(0)
    model = Seq(cell, batch_first)
    T = 12
    x = torch.randn(8, T, 4) if batch_first else torch.randn(T, 8, 4)
    y = torch.randint(0, 3, (8,))
    ref = _reference_profile(model, x, y, 1 if batch_first else 0)
    monitor = gw.GradWatch(model, sinks=[], track_time=True, on_alert="ignore")
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    report = monitor.step()
    monitor.close()
    assert report.metrics is not None
    ratio = float(ref[0] / ref[-1])
    assert report.metrics["time_grad_ratio/rnn"] == pytest.approx(ratio, rel=1e-4)
    assert report.metrics["time_grad_decay/rnn"] == pytest.approx(ratio ** (1 / (T - 1)), rel=1e-4)
    # The caller's tensor is untouched: no grad requirement, no .grad.
    assert not x.requires_grad and x.grad is None


def test_step_norms_against_loop() -> None:
    g = torch.randn(3, 7, 5)
    got = step_norms(g, 1)
    want = torch.tensor([float(g[:, t].double().norm()) for t in range(7)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_parameter_gradients_are_identical_with_and_without_profiling() -> None:
    torch.manual_seed(1)
    base = Seq(nn.LSTM)
    x, y = torch.randn(4, 9, 4), torch.randint(0, 3, (4,))
    grads = []
    for track in (False, True):
        model = Seq(nn.LSTM)
        model.load_state_dict(base.state_dict())
        monitor = gw.GradWatch(model, sinks=[], track_time=track, on_alert="ignore")
        nn.functional.cross_entropy(model(x), y).backward()
        monitor.step()
        monitor.close()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_input_that_requires_grad_is_hooked_not_replaced() -> None:
    torch.manual_seed(2)
    model = Seq(nn.GRU, embed=True)
    seen: list[torch.Tensor] = []
    model.rnn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    monitor = gw.GradWatch(model, sinks=[], track_time=True, on_alert="ignore")
    tokens = torch.randint(0, 5, (3, 6))
    emb = model.embed(tokens)  # what the RNN will get: a non-leaf requiring grad
    nn.functional.cross_entropy(model(tokens), torch.tensor([0, 1, 2])).backward()
    report = monitor.step()
    monitor.close()
    assert seen[0].grad_fn is not None and seen[0].shape == emb.shape  # the embedding's output itself
    assert "time_grad_ratio/rnn" in report.metrics
    assert model.embed.weight.grad is not None


def test_only_logging_steps_are_profiled() -> None:
    torch.manual_seed(3)
    model = Seq(nn.RNN)
    received: list[torch.Tensor] = []
    model.rnn.register_forward_pre_hook(lambda m, args: None)
    model.rnn.register_forward_hook(lambda m, args, out: received.append(args[0]))
    monitor = gw.GradWatch(model, sinks=[], track_time=True, log_every=3, on_alert="ignore")
    keys_per_step = []
    xs = [torch.randn(2, 5, 4) for _ in range(6)]
    for x in xs:
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        r = monitor.step()
        keys_per_step.append(sorted(k for k in (r.metrics or {}) if k.startswith("time_")))
        model.zero_grad()
    monitor.close()
    assert keys_per_step == [
        ["time_grad_decay/rnn", "time_grad_ratio/rnn"], [], [],
        ["time_grad_decay/rnn", "time_grad_ratio/rnn"], [], [],
    ]
    # Logging steps (0, 3) feed the RNN a leaf alias; other steps get the caller's tensor itself.
    assert [received[i] is xs[i] for i in range(6)] == [False, True, True, False, True, True]
    assert all(torch.equal(received[i], xs[i]) for i in range(6))


def test_no_profile_without_grad_or_for_packed_sequences() -> None:
    model = Seq(nn.LSTM)
    monitor = gw.GradWatch(model, sinks=[], track_time=True, on_alert="ignore")
    profiler = monitor._time
    assert isinstance(profiler, TimeProfiler) and profiler.names == ["rnn"]
    with torch.no_grad():
        model(torch.randn(2, 5, 4))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 4), [5, 3], batch_first=True)
    out, _ = model.rnn(packed)
    out.data.sum().backward()
    assert not bool(profiler.take().seen.any())
    monitor.close()
    assert profiler._handles == []


def test_time_vanishing_fires_for_vanilla_rnn_not_for_lstm_at_init() -> None:
    # Physics at init, T=50 blank-after-first-token inputs: the RNN's ratio is ~1e-10 and below,
    # the LSTM with forget-gate bias 3 keeps ~0.1-1 (measured; see the reference scenario).
    found = {}
    for cell, fb in (("rnn", None), ("lstm", 3.0)):
        torch.manual_seed(0)
        model = SequenceClassifier(cell, 8, 64, 8, forget_bias=fb)
        monitor = gw.GradWatch(model, sinks=[], track_time=True, log_every=1, on_alert="ignore")
        ratios = []
        for _ in range(4):
            x = torch.zeros(16, 50, 8)
            tok = torch.randint(0, 8, (16,))
            x[:, 0] = nn.functional.one_hot(tok, 8).float()
            nn.functional.cross_entropy(model(x), tok).backward()
            ratios.append(monitor.step().metrics["time_grad_ratio/rnn"])
            model.zero_grad()
        monitor.close()
        found[cell] = ([a for a in monitor.alerts if a.kind == "vanishing"], ratios)
    rnn_alerts, rnn_ratios = found["rnn"]
    lstm_alerts, lstm_ratios = found["lstm"]
    assert max(rnn_ratios) < 1e-8 and min(lstm_ratios) > 1e-3
    assert lstm_alerts == []
    assert len(rnn_alerts) == 1
    a = rnn_alerts[0]
    assert (a.step, a.layer, a.threshold) == (2, "rnn", 1e-8)  # warm-up of 3 profiles: steps 0, 1, 2
    ema = math.log(rnn_ratios[0])
    for r in rnn_ratios[1:3]:
        ema = 0.7 * ema + 0.3 * math.log(r)
    assert a.value == pytest.approx(math.exp(ema), rel=1e-3)
    assert a.message.startswith("Vanishing gradients across time at step 2: in rnn the first time step gets ")
    assert "so the sequence's start cannot influence the weights." in a.message
    assert any("nn.LSTM or nn.GRU" in r for r in a.remedies)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_ratio": 0.0}, "`min_ratio` must be a number strictly between 0.0 and 1.0; got 0.0"),
        ({"alpha": 1.5}, "`alpha` must be a number strictly between 0.0 and 1.0; got 1.5"),
        ({"warmup": 0}, "`warmup` must be an integer >= 1; got 0"),
    ],
)
def test_time_vanishing_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        TimeVanishing(**kwargs)


def test_track_time_must_be_bool() -> None:
    with pytest.raises(ValueError, match=r"`track_time` must be True, False or None; got 'yes'"):
        gw.GradWatch(nn.Linear(2, 2), sinks=[], track_time="yes")


def test_profiling_is_sync_free_in_forward_backward_and_on_non_logging_steps() -> None:
    from test_syncs import count_syncs

    torch.manual_seed(4)
    model = Seq(nn.LSTM)
    monitor = gw.GradWatch(model, sinks=[], track_time=True, log_every=3, on_nonfinite="warn", on_alert="ignore")
    fwd_bwd, steps = [], []
    for _ in range(6):
        x = torch.randn(2, 7, 4)
        with count_syncs() as calls:
            nn.functional.cross_entropy(model(x), torch.tensor([0, 2])).backward()
        fwd_bwd.append(list(calls))
        with count_syncs() as calls:
            monitor.step()
        steps.append(list(calls))
        model.zero_grad()
    monitor.close()
    assert fwd_bwd == [[]] * 6  # the hooks only queue device work, even on logging steps
    assert [steps[i] for i in (1, 2, 4, 5)] == [[]] * 4
    assert steps[0] == steps[3] == ["tolist"]  # the logging step's single transfer


def test_time_vanishing_remedies_fit_the_cell() -> None:
    from gradwatch.remedies import inspect_model, remedies_for

    shorten = (
        "Shorten the span the gradient must cross: a loss at every time step (not only the last), shorter "
        "or chunked sequences, or attention / skip connections across time."
    )
    lstm = remedies_for("vanishing", inspect_model(Seq(nn.LSTM)), source="time:rnn")
    assert lstm == (
        "If `rnn` is an LSTM, raise its forget-gate bias (entries [H:2H] of bias_ih/bias_hh) to 1, or ~3 for "
        "~50-step memories: a fraction sigmoid(bias)^T of the cell survives T steps at init.",
        shorten,
    )
    rnn = remedies_for("vanishing", inspect_model(Seq(nn.RNN)), source="time:rnn")
    assert len(rnn) == 2 and rnn[1] == shorten
    assert rnn[0].startswith("Replace the vanilla recurrent cell `rnn` with nn.LSTM or nn.GRU")
    # Depth findings on the same model keep the general ranking.
    assert remedies_for("vanishing", inspect_model(Seq(nn.RNN)), source="depth")[0] == rnn[0]
