"""The first hour, sink side (issue 13): one block per alert, JSONL never loses or refuses a run,
small models' console lines, the demo's findings, the report of a run that goes non-finite."""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch import schema
from gradwatch._format import fmt
from gradwatch.alerts import Alert
from gradwatch.cli import format_findings, main
from gradwatch.errors import GradWatchWarning, warn_user
from gradwatch.reference.runner import RunResult
from gradwatch.sinks import JSONL, Console, SinkSet, read_jsonl


def _sigmoid_stack() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def _train(monitor: gw.GradWatch, model: nn.Module, steps: int) -> None:
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.randn(8, 16)).square().mean().backward()
        monitor.step()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------- (1) one block per alert
def test_sinkset_knows_whether_a_sink_prints_alerts() -> None:
    assert SinkSet([Console()]).prints_alerts is True
    assert SinkSet([Console(metrics=False, printer=print)]).prints_alerts is True
    assert SinkSet([JSONL("unused.jsonl")]).prints_alerts is False
    assert SinkSet([]).prints_alerts is False


def test_warn_user_points_at_the_callers_line() -> None:
    with pytest.warns(GradWatchWarning, match="^gradwatch: a notice$") as rec:
        warn_user("gradwatch: a notice")
    assert len(rec) == 1
    assert rec[0].filename == __file__  # not gradwatch/errors.py


def test_defaults_show_each_alert_once_in_the_terminal(capsys, monkeypatch) -> None:
    # The defaults: sinks=None (one Console on stderr) and on_alert="warn". The Console block is
    # the only thing the terminal shows: no GradWatchWarning, no last-resort logging line.
    monkeypatch.setattr(logging, "lastResort", logging.StreamHandler())  # stderr at call time, as Python's
    model = _sigmoid_stack()
    monitor = gw.GradWatch(model, log_every=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(monitor, model, 4)
        monitor.close()
    alert = monitor.alerts[0]
    err = capsys.readouterr().err
    assert [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)] == []
    assert err.count(alert.message) == 1
    block = f"[gradwatch] WARNING vanishing: {alert.message}\n" + "".join(
        f"    {i}. {r}\n" for i, r in enumerate(alert.remedies, 1)
    )
    assert block in err


# ---------------------------------------------------------------- (10) small models
def test_console_lists_each_layer_once_for_a_small_model() -> None:
    out = io.StringIO()
    Console(stream=out).log_metrics(
        {"grad_norm/total": 3.0, "grad_norm/a": 2.0, "grad_norm/b": 0.5, "grad_norm/c": 1e-5, "grad_max/a": 9.0}, 7
    )
    assert out.getvalue() == "[gradwatch] step 7 | grad_norm 3 | layers, smallest first: c 1.00e-05, b 0.5, a 2\n"


def test_console_splits_smallest_and_largest_beyond_twice_top() -> None:
    out = io.StringIO()
    layers = {schema.metric_key(schema.GRAD_NORM, f"l{i}"): 10.0**-i for i in range(5)}
    metrics = {schema.GRAD_NORM_TOTAL: 1.0, **layers}
    Console(stream=out, top=2).log_metrics(metrics, 0)
    assert out.getvalue() == (
        "[gradwatch] step 0 | grad_norm 1 | smallest: l4 1.00e-04, l3 0.001 | largest: l0 1, l1 0.1\n"
    )


# ---------------------------------------------------------------- (6) a cut last line
def _write_run(path: Path, steps: int = 3) -> None:
    sink = JSONL(path)
    sink.log_meta({"layers": ["a"]})
    for s in range(steps):
        sink.log_metrics({"grad_norm/total": 1.0 + s, "grad_norm/a": 1.0 + s}, s)
    sink.close()


def test_reader_skips_a_last_line_cut_by_a_crash_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl"
    _write_run(path)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"type": "metrics", "step": 3, "metr')  # the process died here
    with pytest.warns(GradWatchWarning) as rec:
        records = read_jsonl(path)
    assert [str(w.message) for w in rec] == [
        f"gradwatch: {str(path)!r} line 5 was cut (the run stopped while writing it); "
        "that line is skipped, the other records are read."
    ]
    assert [(r["type"], r.get("step")) for r in records] == [("meta", None), ("metrics", 0), ("metrics", 1),
                                                              ("metrics", 2)]


def test_reader_refuses_a_broken_line_inside_a_run(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    _write_run(path)
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as exc:
        read_jsonl(path)
    assert str(exc.value) == (
        f"{str(path)!r} is not a gradwatch JSONL run: line 3 is not JSON (Unterminated string starting at: column 10)"
    )


def test_append_after_a_crash_keeps_both_runs_readable(tmp_path: Path) -> None:
    path = tmp_path / "grads.jsonl"
    _write_run(path, steps=2)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"type": "metr')
    sink = JSONL(path, append=True)
    sink.log_meta({"layers": ["a"]})
    sink.log_metrics({"grad_norm/total": 5.0}, 10)
    sink.close()
    with pytest.warns(GradWatchWarning, match="line 4 was cut"):
        records = read_jsonl(path)
    assert [(r["type"], r.get("step")) for r in records] == [
        ("meta", None), ("metrics", 0), ("metrics", 1), ("meta", None), ("metrics", 10)
    ]


def test_report_command_reads_a_cut_run_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl"
    _write_run(path)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"type": "alert", "kind": "vani')
    out, err = io.StringIO(), io.StringIO()
    rc = main(["report", str(path), "-o", str(tmp_path / "r.html")], stdout=out, stderr=err)
    assert rc == 0
    assert err.getvalue() == (
        f"gradwatch report: warning: {str(path)!r} line 5 was cut (the run stopped while writing it); "
        "that line is skipped, the other records are read.\n"
    )
    assert out.getvalue() == f"report: {tmp_path / 'r.html'}\n"


# ---------------------------------------------------------------- (7) never truncate a run
def test_an_existing_run_is_kept_and_the_new_one_gets_the_next_version(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "grads.jsonl"
    _write_run(path, steps=1)
    first = path.read_text()
    sink = JSONL(path)
    with pytest.warns(GradWatchWarning) as rec:
        sink.log_metrics({"grad_norm/total": 2.0}, 0)
    sink.log_metrics({"grad_norm/total": 3.0}, 1)  # one notice per sink, not per record
    sink.close()
    assert [str(w.message) for w in rec] == [
        f"gradwatch: {str(path)!r} already holds a run; this run is written to "
        f"{str(tmp_path / 'runs' / 'grads-1.jsonl')!r}. Set `overwrite=True` to replace the file or "
        "`append=True` to add to it."
    ]
    assert rec[0].filename == __file__
    assert path.read_text() == first
    assert sink.path == tmp_path / "runs" / "grads-1.jsonl" and sink.requested_path == path
    assert [r["step"] for r in read_jsonl(sink.path)] == [0, 1]
    third = JSONL(path)
    with pytest.warns(GradWatchWarning, match="grads-2.jsonl"):
        third.log_metrics({"grad_norm/total": 4.0}, 0)
    third.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["grads-1.jsonl", "grads-2.jsonl", "grads.jsonl"]


def test_overwrite_replaces_and_append_adds(tmp_path: Path) -> None:
    path = tmp_path / "grads.jsonl"
    _write_run(path, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)  # an explicit choice: no notice
        sink = JSONL(path, append=True)
        sink.log_metrics({"grad_norm/total": 9.0}, 5)
        sink.close()
        assert [r.get("step") for r in read_jsonl(path)] == [None, 0, 1, 5]
        sink = JSONL(path, overwrite=True)
        sink.log_metrics({"grad_norm/total": 9.0}, 0)
        sink.close()
    assert path.read_text() == '{"type": "metrics", "step": 0, "metrics": {"grad_norm/total": 9.0}}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grads.jsonl"]


def test_an_empty_file_holds_no_run_and_is_used(tmp_path: Path) -> None:
    path = tmp_path / "grads.jsonl"
    path.touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        sink = JSONL(path)
        sink.log_metrics({"grad_norm/total": 1.0}, 0)
        sink.close()
    assert sink.path == path and len(read_jsonl(path)) == 1


def test_append_and_overwrite_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as exc:
        JSONL(tmp_path / "x.jsonl", append=True, overwrite=True)
    assert str(exc.value) == (
        "`append` and `overwrite` cannot both be True: `append` adds to the file, `overwrite` replaces it"
    )


def test_log_record_needs_a_type(tmp_path: Path) -> None:
    sink = JSONL(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match=r"^`record` must have a string 'type' field; got None$"):
        sink.log_record({"step": 1})
    sink.log_record({"type": "summary", "final_loss": math.inf})
    sink.close()
    assert (tmp_path / "x.jsonl").read_text() == '{"type": "summary", "final_loss": "inf"}\n'


# ---------------------------------------------------------------- (8) the demo's findings
def _alert(kind: str, layer: str | None, remedies: tuple[str, ...]) -> Alert:
    return Alert(kind, 5, layer, 5.0, 0.0, "error", f"{kind.capitalize()} gradients at step 5 in {layer}.", remedies)


def test_demo_findings_name_layer_figure_and_first_remedy() -> None:
    runs = [
        RunResult("clipping", "none", "pathology", "nonfinite", 100,
                  alerts=[_alert("spike", None, ()), _alert("nonfinite", "8", ("Clip the gradients.", "Lower lr."))]),
        RunResult("clipping", "norm", "remedy", None, 100),
        RunResult("activation", "sigmoid", "pathology", "vanishing", 100),
    ]
    assert format_findings(runs) == (
        "clipping/none: nonfinite (error) at step 5\n"
        "  layer:  8\n"
        "  figure: Nonfinite gradients at step 5 in 8.\n"
        "  remedy: Clip the gradients.\n"
        "activation/sigmoid: no alert (expected vanishing)"
    )


# ---------------------------------------------------------------- schema and formatter
def test_schema_builds_and_splits_keys() -> None:
    assert schema.metric_key(schema.GRAD_NORM, "enc.0/attn") == "grad_norm/enc.0/attn"
    assert schema.split_key("grad_norm/enc.0/attn") == ("grad_norm", "enc.0/attn")
    assert [schema.split_key(k) for k in schema.FIXED_KEYS] == [(k, None) for k in schema.FIXED_KEYS]
    assert schema.per_layer({"grad_norm/total": 1.0, "grad_norm/a": 2.0, "grad_max/a": 3.0, "loss": 0.1},
                            schema.GRAD_NORM) == {"a": 2.0}
    assert schema.ALERT_KINDS == ("vanishing", "exploding", "spike", "nonfinite", "dead", "saturated",
                                  "accumulating", "no_gradient", "desync")
    assert schema.SEVERITIES == ("info", "warning", "error")
    with pytest.raises(ValueError, match=r"^`layer` must be a non-empty layer name other than 'total'; got 'total'$"):
        schema.metric_key(schema.GRAD_NORM, "total")
    with pytest.raises(ValueError, match=r"^`family` must be a non-empty name without '/'; got 'a/b'$"):
        schema.metric_key("a/b", "x")


def test_the_one_formatter() -> None:
    assert [fmt(v) for v in (0.0, 1.5, 2500.0, 1e-4, 3.2e5, -0.02, math.inf, -math.inf, math.nan, 7, None)] == [
        "0", "1.5", "2.5e+03", "1.00e-04", "3.20e+05", "-0.02", "inf", "-inf", "nan", "7", "-",
    ]


def test_read_jsonl_records_are_strict_json_objects(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps([1, 2]) + "\n" + json.dumps({"type": "metrics", "step": 0, "metrics": {}}) + "\n")
    with pytest.raises(ValueError) as exc:
        read_jsonl(path)
    assert str(exc.value) == f"{str(path)!r} is not a gradwatch JSONL run: line 1 is not a JSON object (got [1, 2])"


def test_under_lightning_without_a_console_the_warning_points_at_the_fit_call(tmp_path: Path) -> None:
    from lightning_helpers import loader, make_module_class, pl_package, trainer_kwargs

    from gradwatch.lightning import GradWatchCallback

    pl = pl_package()
    torch.manual_seed(0)
    module = make_module_class(pl)(depth=10, width=32, act="sigmoid")
    cb = GradWatchCallback(log_every=1, sinks=[JSONL(tmp_path / "gw.jsonl")], on_alert="warn")
    trainer = pl.Trainer(callbacks=[cb], logger=False, limit_train_batches=4, **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader())  # the line the warning must name
    fit_line = _line_of("trainer.fit(module, loader())  # the line the warning must name")
    alerts = [str(a.message) for a in caught if issubclass(a.category, GradWatchWarning)]
    assert alerts == [a.message for a in cb.monitor.alerts] and alerts
    assert {(w.filename, w.lineno) for w in caught if issubclass(w.category, GradWatchWarning)} == {
        (__file__, fit_line)
    }


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip() == text)
