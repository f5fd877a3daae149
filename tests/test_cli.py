"""The `gradwatch` command line: demo, report, argument errors, `python -m gradwatch`."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from wandb_reader import read_records, read_run

import gradwatch as gw
from gradwatch.cli import main
from gradwatch.sinks.jsonl import read_jsonl


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def clipping_demo(tmp_path_factory) -> tuple[Path, int, str, str]:
    out = tmp_path_factory.mktemp("demo")
    return (out, *_run(["demo", "--scenario", "clipping", "--out", str(out)]))


def test_demo_prints_the_table_and_writes_runs_and_report(clipping_demo) -> None:
    out, rc, stdout, stderr = clipping_demo
    assert rc == 0
    lines = stdout.strip().splitlines()
    assert lines[0].split() == [
        "scenario", "variant", "role", "alerts", "raised", "final", "loss", "first/last", "layer",
        "first/last", "time", "as", "expected",
    ]
    rows = [line.split() for line in lines[2:6]]
    assert [r[:4] for r in rows] == [
        ["clipping", "none", "pathology", "nonfinite,"],  # nonfinite, exploding: the Inf ends an explosion (issue 11)
        ["clipping", "norm", "remedy", "none"],
        ["clipping", "agc", "remedy", "none"],
        ["clipping", "zscore", "remedy", "none"],
    ]
    assert [r[-1] for r in rows] == ["yes", "yes", "yes", "yes"]
    assert rows[0][4:6] == ["exploding", "inf"]  # the unclipped run diverged; the clipped ones trained
    assert all(float(r[4]) < 1.0 for r in rows[1:])
    assert f"report: {out / 'report.html'}" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "clipping-agc.jsonl", "clipping-none.jsonl", "clipping-norm.jsonl", "clipping-zscore.jsonl", "report.html",
    ]
    # stderr is no terminal here: one line per finished run instead of a bar.
    assert [line.split()[0] for line in stderr.strip().splitlines()] == [
        "clipping/none", "clipping/norm", "clipping/agc", "clipping/zscore",
    ]
    assert "nonfinite, exploding (" in stderr.splitlines()[0]


def test_demo_prints_layer_figure_and_first_remedy_under_the_table(clipping_demo) -> None:
    out, _, stdout, _ = clipping_demo
    records = read_jsonl(out / "clipping-none.jsonl")
    alert = next(r for r in records if r["type"] == "alert" and r["kind"] == "nonfinite")
    assert (alert["step"], alert["layer"]) == (5, "8")
    block = (
        f"clipping/none: nonfinite ({alert['severity']}) at step 5\n"
        "  layer:  8\n"
        f"  figure: {alert['message']}\n"
        f"  remedy: {alert['remedies'][0]}\n"
    )
    assert "\n\n" + block + "\nreport: " in stdout  # one block per pathology, between the table and the report line
    assert stdout.index("as expected") < stdout.index(block)


def test_demo_runs_are_gradwatch_jsonl_with_a_summary(clipping_demo) -> None:
    out = clipping_demo[0]
    recs = read_jsonl(out / "clipping-norm.jsonl")
    assert recs[0]["type"] == "meta" and recs[0]["clip"] == "Norm(max_norm=1, norm_type=2)"
    assert [r["step"] for r in recs if r["type"] == "metrics"] == list(range(100))  # the scenario logs every step
    summary = recs[-1]
    assert summary["type"] == "summary"
    assert (summary["scenario"], summary["variant"], summary["role"], summary["steps"]) == (
        "clipping", "norm", "remedy", 100,
    )
    assert summary["alert_kinds"] == []
    assert summary["numel"] == {"0": 32 * 64 + 64, "2": 64 * 64 + 64, "4": 64 * 64 + 64, "6": 64 * 64 + 64,
                                "8": 64 * 8 + 8}


def test_steps_option_and_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    rc = main(["demo", "--scenario", "activation", "--steps", "4", "--out", str(tmp_path), "--no-report"],
              stdout=io.StringIO(), stderr=err)
    assert rc == 0
    # The sigmoid stack's condition persists from step 2; no logging step follows within 4 steps,
    # so the monitor's close() reports it.
    alerts = [r for r in read_jsonl(tmp_path / "activation-sigmoid.jsonl") if r["type"] == "alert"]
    assert [(a["kind"], a["step"]) for a in alerts] == [("vanishing", 2)]
    recs = read_jsonl(tmp_path / "activation-relu+he.jsonl")
    assert recs[-1]["steps"] == 4 and [r["step"] for r in recs if r["type"] == "metrics"] == [0]
    bar = err.getvalue()
    assert "\ractivation/sigmoid" in bar and "[############################]    4/4" in bar


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--scenario", "nope"], "argument --scenario: invalid choice: 'nope' (choose from"),
        (["demo", "--steps", "0"], "argument --steps: must be an integer >= 1; got '0'"),
        (["demo", "--steps", "ten"], "argument --steps: must be an integer >= 1; got 'ten'"),
        (["report"], "the following arguments are required: RUN.jsonl"),
        (["report", "missing.jsonl"], "run file 'missing.jsonl' does not exist"),
        ([], "the following arguments are required: {demo,report,bench}"),
        (["train"], "argument {demo,report,bench}: invalid choice: 'train'"),
    ],
)
def test_bad_arguments_are_clear_errors(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_paths(tmp_path: Path, capsys) -> None:
    f = tmp_path / "file"
    f.write_text("x", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"--out '.*file' exists and is not a folder"):
        main(["demo", "--out", str(f)])
    with pytest.raises(SystemExit):
        main(["report", str(f), "-o", str(tmp_path / "r.html")])
    assert "is not a gradwatch JSONL run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(f), "-o", str(tmp_path)])
    assert f"-o/--output {str(tmp_path)!r} is a folder; give an .html file path" in capsys.readouterr().err


def test_python_dash_m_gradwatch(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gradwatch", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, f"gradwatch {gw.__version__}")
    done = subprocess.run([sys.executable, "-m", "gradwatch", "demo", "--scenario", "bogus"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'bogus'" in done.stderr


def test_demo_with_wandb_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    rc, stdout, stderr = _run(["demo", "--scenario", "clipping", "--steps", "6", "--out", str(tmp_path),
                               "--wandb", "--no-report"])
    assert wandb.run is None  # each run was finished by its sink
    assert "W&B: logging every run in offline mode (project gradwatch-demo)" in stderr
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 4
    names = [next(r.run.display_name for r in read_records(f) if r.WhichOneof("record_type") == "run")
             for f in files]
    assert sorted(names) == ["clipping-agc", "clipping-none", "clipping-norm", "clipping-zscore"]
    runs = dict(zip(names, (read_run(f) for f in files)))
    for r in runs.values():
        assert [h["gradwatch/step"] for h in r.history if "grad_norm/total" in h] == [0, 1, 2, 3, 4, 5]
        assert r.config["gradwatch"]["log_every"] == 1  # the clipping scenario logs every step
        assert r.exit_code == 0
    none = runs["clipping-none"]
    assert [a["title"] for a in none.alerts][:1] == ["gradwatch: non-finite gradients in 8"]


def test_report_without_matplotlib_says_how_to_install_it(clipping_demo, monkeypatch, capsys) -> None:
    out = clipping_demo[0]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import raises ImportError
    with pytest.raises(SystemExit) as exc:
        main(["report", str(out / "clipping-none.jsonl"), "-o", str(out / "x.html")])
    assert exc.value.code == 1
    assert capsys.readouterr().err == (
        "gradwatch report: error: gradwatch report needs matplotlib: pip install 'gradwatch[report]'\n"
    )
    assert not (out / "x.html").exists()
