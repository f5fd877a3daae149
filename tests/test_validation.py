"""Bad input gets a clear error naming the argument, the bad value and the allowed values."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import gradwatch as gw


def _model() -> nn.Module:
    return nn.Linear(3, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_nonfinite": "drop"}, "`on_nonfinite` must be one of 'skip', 'warn', 'raise', 'ignore'; got 'drop'"),
        ({"on_alert": "print"}, "`on_alert` must be one of 'warn', 'raise', 'ignore'; got 'print'"),
        ({"granularity": "tensor"}, "`granularity` must be one of 'module', 'parameter'; got 'tensor'"),
        ({"log_every": 0}, "`log_every` must be an integer >= 1; got 0"),
        ({"log_every": 2.5}, "`log_every` must be an integer >= 1; got 2.5"),
        ({"log_every": True}, "`log_every` must be an integer >= 1; got True"),
        ({"grad_max_every": 0}, "`grad_max_every` must be an integer >= 1; got 0"),
        ({"grad_max_every": "10"}, "`grad_max_every` must be an integer >= 1; got '10'"),
        ({"param_norm_every": 0}, "`param_norm_every` must be an integer >= 1; got 0"),
        ({"param_norm_every": 2.0}, "`param_norm_every` must be an integer >= 1; got 2.0"),
        ({"history_size": 0}, "`history_size` must be an integer >= 1; got 0"),
        ({"track_activations": "yes"}, "`track_activations` must be True or False; got 'yes'"),
        ({"clip": 1.0}, "`clip` must be None or a clipping strategy such as gw.clip.Norm(1.0); got 1.0"),
        ({"detectors": "all"}, "`detectors` must be 'default', None or a list of Detector objects; got 'all'"),
        ({"sinks": "console"}, "`sinks` must be None, a sink or a list of sinks"),
        ({"sinks": [print]}, "`sinks` must be None, a sink or a list of sinks"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
def test_bad_option_values_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        gw.GradWatch(_model(), **kwargs)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'log_evry'"):
        gw.GradWatch(_model(), log_evry=5)


def test_positional_options_are_rejected():
    with pytest.raises(TypeError, match="takes 2 positional arguments but 3 were given"):
        gw.GradWatch(_model(), "default")


def test_non_module_model_is_a_type_error():
    with pytest.raises(TypeError, match=re.escape("`model` must be a torch.nn.Module; got list")):
        gw.GradWatch([nn.Linear(2, 2)])


def test_model_without_trainable_parameters_warns_and_records_nothing():
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.warns(gw.GradWatchWarning, match="Linear has no trainable parameters; the monitor will record nothing"):
        monitor = gw.GradWatch(frozen, sinks=[])
    frozen(torch.randn(2, 3))
    report = monitor.step()
    assert (report.step, report.metrics, report.alerts) == (0, None, [])
    monitor.close()


def test_jsonl_path_in_a_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"`path` {str(blocker / 'runs' / 'g.jsonl')!r} cannot be created: "
                                                   f"{str(blocker)!r} exists and is not a folder")):
        gw.sinks.JSONL(blocker / "runs" / "g.jsonl")
    with pytest.raises(ValueError, match="`path` must be a file, but .* is a folder"):
        gw.sinks.JSONL(tmp_path)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: gw.clip.Norm(0), "`max_norm` must be a finite number > 0; got 0"),
        (lambda: gw.clip.Norm(float("inf")), "`max_norm` must be a finite number > 0; got inf"),
        (lambda: gw.clip.Norm(1.0, norm_type=-1), "`norm_type` must be a number > 0 or float('inf'); got -1"),
        (lambda: gw.clip.Value(-1.0), "`clip_value` must be a finite number > 0; got -1.0"),
        (lambda: gw.Spike(alpha=1.5), "`alpha` must be a number strictly between 0.0 and 1.0; got 1.5"),
        (lambda: gw.Spike(min_factor=0.5), "`min_factor` must be > 1; got 0.5"),
        (lambda: gw.Vanishing(persist=0), "`persist` must be an integer >= 1; got 0"),
        (lambda: gw.Dead(threshold=2), "`threshold` must be a number strictly between 0.0 and 1.0; got 2"),
        (lambda: gw.sinks.Console(top=-1), "`top` must be an integer >= 0; got -1"),
    ],
    ids=["norm0", "norm_inf", "norm_type", "value", "spike_alpha", "spike_factor", "persist", "dead", "console"],
)
def test_component_arguments_are_checked(factory, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        factory()


def test_no_warning_for_a_normal_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gw.GradWatch(_model(), sinks=[]).close()


def _callbacks():
    from gradwatch.integrations.transformers import GradWatchTrainerCallback
    from gradwatch.lightning import GradWatchCallback

    return [(GradWatchCallback, "the Trainer's precision plugin"), (GradWatchTrainerCallback, "the Trainer")]


@pytest.mark.parametrize("index", [0, 1], ids=["lightning", "transformers"])
def test_callbacks_check_options_like_the_monitor(index):
    cls, scaler_source = _callbacks()[index]
    name = cls.__name__
    with pytest.raises(TypeError, match=re.escape(
        f"{name} got unexpected keyword argument(s) 'log_evry'; allowed: detectors, clip, on_nonfinite, on_alert, "
        "sinks, log_every, grad_max_every, param_norm_every, granularity, track_activations, track_time, "
        "history_size, max_alerts, remind_every"
    )):
        cls(log_evry=3)
    with pytest.raises(TypeError, match=re.escape(f"{name} takes the AMP scaler from {scaler_source}; do not pass")):
        cls(scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=re.escape("`log_every` must be an integer >= 1; got 0")):
        cls(log_every=0)
    sink = gw.sinks.Console()
    assert cls(sinks=(sink,)).sinks == [sink]
