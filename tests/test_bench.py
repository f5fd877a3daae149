"""`gradwatch bench`: the case registry, the scoring rules, the remedy keyword rule, the table, JSON and exit status.

The full benchmark (~1 minute) is not run here; a few cases run end to end.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.bench import (
    CATEGORIES,
    AlertRecord,
    Case,
    Trial,
    all_cases,
    classify_remedy,
    get_case,
    judge,
    register,
    run_bench,
    run_case,
    to_json,
)
from gradwatch.bench import data as bench_data
from gradwatch.bench.loop import sgd, train
from gradwatch.bench.registry import CASES
from gradwatch.bench.report import HEADER, format_row, format_table, summary_line
from gradwatch.cli import main


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------------ registry
def test_registry_has_30_faulty_programs_and_20_controls_with_distinct_names() -> None:
    cases = all_cases()
    faulty = [c for c in cases.values() if not c.control]
    controls = [c for c in cases.values() if c.control]
    assert len(faulty) >= 30
    assert len(controls) >= 20
    assert len(set(cases)) == len(cases) == len(faulty) + len(controls)
    assert all(name == c.name for name, c in cases.items())
    # the field's public cases are ported, each faulty case names accepted fix categories
    sources = {c.source for c in faulty}
    assert {"AUTOTRAINER", "DeepDiagnosis", "TrainCheck", "reference"} <= sources
    assert all(c.remedy and set(c.remedy) <= set(CATEGORIES) for c in faulty)
    assert all(c.remedy == () for c in controls)
    kinds = {c.expect for c in faulty}
    assert {"vanishing", "exploding", "spike", "nonfinite", "dead", "saturated", "accumulating", "no_gradient"} <= kinds


def test_register_rejects_duplicates_unknown_categories_and_unknown_sources() -> None:
    existing = next(iter(all_cases().values()))
    with pytest.raises(ValueError, match=f"case {existing.name!r} is already registered"):
        register(existing)
    with pytest.raises(ValueError, match="case 'x': remedy category 'magic' is unknown; allowed: inputs, learning_"):
        register(Case("x", "gradwatch", "", lambda: [], "vanishing", ("magic",)))
    with pytest.raises(ValueError, match="case 'x': `source` must be one of AUTOTRAINER, DeepDiagnosis, TrainCheck, "
                                         "reference, gradwatch; got 'blog'"):
        register(Case("x", "blog", "", lambda: [], "vanishing", ("init",)))
    with pytest.raises(ValueError, match="case 'x': a faulty case must name its accepted remedy categories"):
        register(Case("x", "gradwatch", "", lambda: [], "vanishing"))
    with pytest.raises(ValueError, match=r"case 'x': a control \(expect=None\) has no remedy categories"):
        register(Case("x", "gradwatch", "", lambda: [], None, ("init",)))
    assert "x" not in CASES
    with pytest.raises(ValueError, match="unknown case 'nope'; `gradwatch bench --list` shows the"):
        get_case("nope")


# ------------------------------------------------------------------------------------ remedy keyword rule
@pytest.mark.parametrize(
    ("remedy", "category"),
    [
        ("Normalise the inputs to zero mean and unit variance: `0` receives inputs of RMS 58.", "inputs"),
        ("Check the loss scale: normalise inputs and regression targets to unit variance.", "inputs"),
        ("Look at the batch of that step for outliers or corrupted labels.", "inputs"),
        ("Lower the learning rate: SGD lr 3.0 moved `1` by 40% of its weights in one step.", "learning_rate"),
        ("Lower the peak learning rate or lengthen its warm-up.", "learning_rate"),
        ("Raise the batch size: one sample per step is mostly noise.", "batch_size"),
        ("Initialise `0`, `2` with He init (nn.init.kaiming_normal_(w, nonlinearity='relu')).", "init"),
        ("Never initialise weights to zero: `0` is all zeros.", "init"),
        ("Replace the sigmoid activations `1` with nn.ReLU or nn.LeakyReLU (with He init).", "architecture"),
        ("Add normalisation (nn.BatchNorm1d after each Linear) so every layer's input stays at unit scale.",
         "architecture"),
        ("Scale the attention scores by 1/sqrt(d_k) before the softmax.", "architecture"),
        ("Clip gradients: gw.clip.Norm(max_norm=2.4), or gw.clip.ZScore() to clip only outliers.", "clipping"),
        ("Find the operation that overflows: log(0), division by ~0, sqrt of a negative.", "numerics"),
        ("Under float16 use torch.amp.GradScaler, or train in bfloat16; lower the learning rate.", "numerics"),
        ("Call optimizer.zero_grad() once per optimizer step: `fc` carries 7 steps of gradients.", "zero_grad"),
        ("`aux_head` is never used in forward: call it, or remove it from the optimizer.", "unused_layer"),
        ("The features reaching `head` are detached: remove the .detach().", "unused_layer"),
        ("`head` has requires_grad=False but is all the optimizer updates: unfreeze it.", "frozen"),
        ("Keep training; all is well.", None),
    ],
)
def test_classify_remedy_takes_the_category_whose_keyword_comes_first(remedy: str, category: str | None) -> None:
    assert classify_remedy(remedy) == category


def test_every_category_classifies_its_own_examples() -> None:
    for c in CATEGORIES.values():
        assert [classify_remedy(e) for e in c.examples] == [c.name] * len(c.examples)


# ------------------------------------------------------------------------------------------------- scoring
def _case(expect: str | None, remedy: tuple[str, ...] = (), **kw: object) -> Case:
    return Case("synthetic", "gradwatch", "", lambda: [], expect, remedy, **kw)  # type: ignore[arg-type]


def _alert(kind: str, step: int, remedy: str = "", layer: str | None = "0") -> AlertRecord:
    return AlertRecord(kind, step, layer, "warning", remedy)


CLIP = "Clip gradients: gw.clip.Norm(max_norm=1.0)."
INIT = "Initialise `0` with He init."


def test_judge_faulty_case_the_expected_kind_first_and_its_first_remedy() -> None:
    case = _case("exploding", ("init",))
    r = judge(case, [Trial((_alert("exploding", 3, INIT), _alert("nonfinite", 3, CLIP), _alert("exploding", 1, CLIP)),
                           40)])
    # first alert of the kind by step (step 1, emitted later), a different kind at the same step is allowed
    assert (r.detected, r.first_step, r.remedy_category, r.remedy_ok, r.ok) == (True, 1, "clipping", False, False)
    assert r.got == "exploding@1, nonfinite@3"
    r = judge(case, [Trial((_alert("nonfinite", 0, CLIP), _alert("exploding", 1, INIT)), 40)])
    assert (r.detected, r.first_step, r.remedy_category, r.remedy_ok, r.ok) == (False, None, "init", False, False)
    r = judge(case, [Trial((_alert("exploding", 2, INIT),), 40)])
    assert (r.detected, r.first_step, r.remedy_category, r.remedy_ok, r.ok) == (True, 2, "init", True, True)
    r = judge(case, [Trial((), 40)])
    assert (r.detected, r.first_step, r.remedy_category, r.remedy_ok, r.ok, r.got) == (
        False, None, None, False, False, "none")


def test_judge_control_any_alert_is_a_false_alarm() -> None:
    r = judge(_case(None), [Trial((_alert("spike", 90, CLIP),), 100)])
    assert (r.detected, r.false_alarm, r.remedy_ok, r.ok) == (None, True, None, False)
    r = judge(_case(None), [Trial((), 100)])
    assert (r.false_alarm, r.ok) == (False, True)


def test_judge_across_seeds_uses_each_seeds_oracle_and_only_the_scored_kinds() -> None:
    case = _case("dead", ("architecture",), scored_kinds=("dead",))
    leaky = "Replace `1` with nn.LeakyReLU(0.01)."
    trials = [
        Trial((_alert("vanishing", 2), _alert("dead", 5, leaky)), 60, 0, "dead", True, "layer 3 dead"),
        Trial((_alert("vanishing", 2),), 60, 1, None, True, "alive"),  # healthy seed: vanishing is not scored
        Trial((_alert("dead", 9, leaky),), 60, 2, "dead", True, "layer 1 dead"),
    ]
    r = judge(case, trials)
    assert (r.detected, r.first_step, r.remedy_category, r.remedy_ok, r.remedy_runs, r.ok) == (
        True, 5, "architecture", True, (2, 2), True)
    assert r.got == "dead on 2/3 seeds (oracle: 2 died); 3/3 right"
    assert format_row(r)[3:] == ("step 5", "yes (architecture; 2/2 runs)", "yes")
    trials[1] = Trial((_alert("dead", 30, leaky),), 60, 1, None, True, "alive")  # a healthy seed called dead
    r = judge(case, trials)
    assert (r.detected, r.ok, r.got) == (False, False, "dead on 3/3 seeds (oracle: 2 died); 2/3 right")


def test_judge_a_program_that_fails_is_wrong() -> None:
    r = judge(_case("dead", ("init",)), (), 0.1, "Traceback ...\nRuntimeError: boom\n")
    assert (r.ok, r.detected, r.got) == (False, False, "error: RuntimeError: boom")


# ------------------------------------------------------------------------------------- end to end (real runs)
FAST = ("normalise_zero_rows", "control_logistic_regression", "control_frozen_backbone")


@pytest.fixture(scope="module")
def fast_run() -> tuple[int, str, str, dict]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sub" / "bench.json"
        rc, out, err = _cli(["bench", "--only", *FAST, "--json", str(path)])
        return rc, out, err, json.loads(path.read_text(encoding="utf-8"))


def test_fast_subset_exact_rows_summary_and_exit_status(fast_run) -> None:
    rc, out, err, _ = fast_run
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["case", "expected", "got", "first", "alert", "top-1", "remedy", "ok"]
    rows = [line.split() for line in lines[2:5]]
    assert rows == [
        ["normalise_zero_rows", "nonfinite", "/", "numerics", "nonfinite@0", "step", "0", "yes", "(numerics)", "yes"],
        ["control_logistic_regression", "none", "none", "-", "-", "yes"],
        ["control_frozen_backbone", "none", "none", "-", "-", "yes"],
    ]
    assert lines[6].startswith(
        "recall 1/1 (100%), false alarms 0/2 controls, median steps to first correct alert 0, "
        "top-1 remedy 1/1 (100%), "
    )
    assert lines[7].startswith("json: ")
    assert [line.split()[:3] for line in err.splitlines()] == [
        ["[", "1/3]", "normalise_zero_rows"], ["[", "2/3]", "control_logistic_regression"],
        ["[", "3/3]", "control_frozen_backbone"],
    ]


def test_json_document_schema(fast_run) -> None:
    _, _, _, doc = fast_run
    assert set(doc) == {"version", "summary", "cases"}
    s = doc["summary"]
    assert {k: s[k] for k in s if k != "seconds"} == {
        "faulty": 1, "controls": 2, "detected": 1, "recall": 1.0, "false_alarms": 0,
        "median_steps_to_first_correct_alert": 0, "remedy_right": 1, "remedy_scored": 1,
        "top1_remedy_accuracy": 1.0, "wrong": [],
    }
    assert isinstance(s["seconds"], float)
    assert [c["name"] for c in doc["cases"]] == list(FAST)
    first = doc["cases"][0]
    assert set(first) == {
        "name", "source", "summary", "role", "expect", "remedy_accepted", "ok", "detected", "false_alarm",
        "first_step", "remedy_category", "remedy_ok", "remedy_runs", "got", "seconds", "error", "trials",
    }
    assert (first["role"], first["expect"], first["remedy_accepted"], first["ok"], first["first_step"],
            first["remedy_runs"]) == ("faulty", "nonfinite", ["numerics"], True, 0, [1, 1])
    (trial,) = first["trials"]
    assert set(trial) == {"alerts", "steps", "seed", "expect", "oracle", "note"}
    assert trial["steps"] == 40
    nonfinite = [a for a in trial["alerts"] if a["kind"] == "nonfinite"]
    assert set(nonfinite[0]) == {"kind", "step", "layer", "severity", "remedy"}
    assert nonfinite[0]["step"] == 0
    assert classify_remedy(nonfinite[0]["remedy"]) == "numerics"
    control = doc["cases"][1]
    assert (control["role"], control["expect"], control["remedy_accepted"], control["detected"],
            control["false_alarm"], control["trials"][0]["alerts"]) == ("control", None, [], None, False, [])


@pytest.fixture
def mislabelled() -> Iterator[None]:
    """A healthy training registered as if it were faulty, and a program that crashes: both are wrong cases."""

    def healthy() -> Trial:
        x, y = bench_data.teacher_classes(classes=2)
        torch.manual_seed(0)
        return train(nn.Linear(20, 2), bench_data.Sampler(x, y, 64), F.cross_entropy, steps=20, optimizer=sgd(0.5))

    def crash() -> Trial:
        raise RuntimeError("the program under test failed")

    register(Case("test_mislabelled", "gradwatch", "healthy logistic regression", healthy, "exploding", ("init",)))
    register(Case("test_crash", "gradwatch", "crashes", crash))
    yield
    del CASES["test_mislabelled"], CASES["test_crash"]


def test_exit_status_1_when_a_case_is_wrong(mislabelled) -> None:
    rc, out, _ = _cli(["bench", "--only", "test_mislabelled", "test_crash", "--no-progress"])
    assert rc == 1
    lines = out.splitlines()
    assert [line.split() for line in lines[2:4]] == [
        ["test_mislabelled", "exploding", "/", "init", "none", "-", "no", "(no", "alert)", "NO"],
        ["test_crash", "none", "error:", "RuntimeError:", "the", "program", "under", "test", "failed", "-", "-", "NO"],
    ]
    assert lines[5].startswith("recall 0/1 (0%), false alarms 1/1 controls, median steps to first correct alert -, "
                               "top-1 remedy 0/1 (0%), ")
    assert lines[6] == "2 case(s) wrong: test_mislabelled, test_crash"


def test_unknown_case_names_exit_2_and_list_names_every_case() -> None:
    rc, out, err = _cli(["bench", "--only", "nope", "control_vae"])
    assert (rc, out) == (2, "")
    assert err == ("gradwatch bench: error: unknown case(s) 'nope' for --only; `gradwatch bench --list` shows the "
                   "names\n")
    rc, out, _ = _cli(["bench", "--list"])
    assert rc == 0
    assert [line.split()[0] for line in out.splitlines()] == list(all_cases())


def test_subprocess_case_runs_in_a_fresh_interpreter_with_the_same_result() -> None:
    case = get_case("control_logistic_regression")
    inproc = run_case(case)
    sub = run_case(dataclasses.replace(case, subprocess=True))
    assert sub.error is None
    assert [t.to_dict() for t in sub.trials] == [t.to_dict() for t in inproc.trials]
    assert (sub.ok, format_row(sub)) == (True, format_row(inproc))


def test_table_and_summary_of_an_empty_selection() -> None:
    result = run_bench([])
    assert format_table(result).splitlines()[0].split() == " ".join(HEADER).split()
    assert summary_line(result) == ("recall 0/0 (-), false alarms 0/0 controls, median steps to first correct "
                                    "alert -, top-1 remedy 0/0 (-), 0s")
    assert to_json(result)["cases"] == []


def test_python_dash_m_gradwatch_bench() -> None:
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "bench", "--only", "control_logistic_regression"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2].split() == ["control_logistic_regression", "none", "none", "-", "-", "yes"]
