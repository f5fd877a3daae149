"""The example scripts run as a user would run them (a subprocess each, in a fresh folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.reference import get_scenario

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, cwd: Path) -> str:
    # A fresh process, as a user runs it: not attached to a wandb service an earlier test started.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_plain_loop(tmp_path):
    out = _run("plain_loop.py", tmp_path)
    assert "records: runs/plain_loop/*.jsonl" in out
    files = sorted((tmp_path / "runs" / "plain_loop").glob("*.jsonl"))
    assert files
    for f in files:
        records = [json.loads(line) for line in f.read_text().splitlines()]
        assert records[0]["type"] == "meta"
        steps = [r["step"] for r in records if r["type"] == "metrics"]
        assert steps == sorted(set(steps)) and steps[0] == 0


def test_lightning_callback(tmp_path):
    out = _run("lightning_callback.py", tmp_path)
    assert "resumed: monitor steps 20 -> 40, alerts carried over: True" in out


def test_wandb_alerts(tmp_path):
    out = _run("wandb_alerts.py", tmp_path)
    assert "W&B alerts sent: ['vanishing', 'spike', 'exploding']" in out
    run_dir = next(line.split()[-1] for line in out.splitlines() if line.startswith("upload it with:  wandb sync "))
    assert list((tmp_path / run_dir).glob("*.wandb"))


@pytest.mark.parametrize(
    "scenario", ["activation", "recurrence", "residual", "initialisation", "normalisation", "clipping"]
)
def test_remedy_example(tmp_path, scenario):
    out = _run(f"remedy_{scenario}.py", tmp_path)
    lines = [line for line in out.splitlines() if line.startswith(("pathology ", "remedy "))]
    variants = get_scenario(scenario).variants
    assert len(lines) == len(variants)
    for line, variant in zip(lines, variants):
        assert line.split()[:2] == [variant.role, variant.name]
        if variant.role == "remedy":
            assert "no alert" in line, line
        else:
            assert f"  {variant.expect}" in line, line  # the kinds follow the loss column


def test_custom_trainer_uses_the_public_step_api_with_accumulation_and_resume(tmp_path):
    out = _run("custom_trainer.py", tmp_path)
    assert out.splitlines() == [
        "first run: steps 0-29, alerts: [('vanishing', 2)]",
        "resumed at step 30: steps 30-59, new alerts: []",
        "closed: True",
        "records: runs/custom_trainer/grads.jsonl",
    ]
    records = [json.loads(line) for line in (tmp_path / "runs/custom_trainer/grads.jsonl").read_text().splitlines()]
    assert [(r["type"], r.get("step")) for r in records] == [
        ("meta", None), ("metrics", 0), ("metrics", 10), ("alert", 2), ("metrics", 20),
        ("meta", None), ("metrics", 30), ("metrics", 40), ("metrics", 50),
    ]
    assert all(r["metrics"]["loss"] > 0 for r in records if r["type"] == "metrics")
    assert records[0]["skip"] == "device"  # fused AdamW skips a poisoned step on the device


def test_custom_detector_fires_on_its_layer_and_checkpoints_its_declared_state(tmp_path):
    out = _run("custom_detector.py", tmp_path)
    lines = out.splitlines()
    assert lines[0] == "out_of_band at step 13 on 2: gradient norm of 2 is 932, outside [0.001, 10] for 2 steps"
    assert lines[-1] == "checkpointed state of NormBand: ['fired_step', 'fired_value', 'streak']"


def test_preflight(tmp_path):
    out = _run("preflight.py", tmp_path).splitlines()
    assert out[0] == "gradwatch pre-flight: Sequential, 3 step(s) on a batch of 64 with Adam(lr=0.001): 1 finding"
    assert any(line.startswith("  [warning] vanishing: Vanishing gradients along depth at step 0: ") for line in out)
    first_remedy = "      1. Initialise `0`, `2`, `4`, `6` (and 17 more, 21 in all) with He init"
    assert any(line.startswith(first_remedy) for line in out)
    assert "he_init=False: ok=False kinds=['vanishing']" in out
    assert "gradwatch pre-flight: Sequential, 3 step(s) on a batch of 64 with Adam(lr=0.001): ok" in out
    assert "he_init=True: ok=True kinds=[]" in out
