"""Real 2-process jobs on CPU with gloo: DDP and FSDP2 (``fully_shard``) with gradwatch attached.

The jobs are the scripts ``tests/scripts/dist_ddp.py`` and ``dist_fsdp.py``, launched through
``subprocess`` (each with a time-out) and started together to share the import time. Every value
they record is checked against a single-process float64 reference computed here with autograd on
the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.sinks.jsonl import read_jsonl

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import dist_common as C  # noqa: E402

TIMEOUT_S = 240
LAYERS = C.LAYERS
DDP_STEPS, DDP_NAN_STEP, DDP_LOG_EVERY = 6, 3, 2
FSDP_STEPS, FSDP_NAN_STEP, FSDP_LOG_EVERY, MAX_NORM = 4, 1, 2, 0.05


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run both scripts at once; return their output folders."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("ddp", "fsdp")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(SCRIPTS / f"dist_{name}.py"), str(d)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for name, d in dirs.items()
    }
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"dist_{name}.py timed out after {TIMEOUT_S}s:\n{out.decode()[-3000:]}")
        assert proc.returncode == 0, f"dist_{name}.py failed:\n{out.decode()[-3000:]}"
    return dirs


def ranks(d: Path) -> list[dict[str, Any]]:
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(C.WORLD)]


# ---------------------------------------------------------------- helpers
reference = C.reference


def rank_local(key: str) -> bool:
    """Metrics of the rank's own data (its input batch), not of the replicated gradients."""
    return key.startswith("input/")


def assert_close(got: float, want: float, rel: float = 1e-5, abs_: float = 1e-7, what: str = "") -> None:
    assert got == pytest.approx(want, rel=rel, abs=abs_), f"{what}: got {got!r}, want {want!r}"


def assert_weights(got: list[float], want: list[float], what: str) -> None:
    g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    assert g.shape == w.shape, what
    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def single_process_records(tmp_path: Path) -> list[dict[str, Any]]:
    """gradwatch in one process on the whole global batch (the records DDP must reproduce)."""
    model = C.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "single.jsonl"
    monitor = gw.GradWatch(
        model, sinks=[gw.sinks.JSONL(path)], log_every=DDP_LOG_EVERY, grad_max_every=1, param_norm_every=1
    )
    for step in range(DDP_STEPS):
        x, y = C.batch(step)
        C.loss_fn(model(x), y).backward()
        monitor.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    monitor.close()
    return read_jsonl(path)


# ---------------------------------------------------------------- DDP
def test_ddp_only_rank0_writes_one_meta_and_one_record_per_logging_step(jobs: dict[str, Path]) -> None:
    records = read_jsonl(jobs["ddp"] / "ddp.jsonl")
    assert [r["type"] for r in records] == ["meta", "metrics", "metrics", "metrics"]
    assert records[0]["layers"] == LAYERS
    assert [r["step"] for r in records[1:]] == [0, 2, 4]
    r0, r1 = ranks(jobs["ddp"])
    assert r0["records"]["steps"] == r1["records"]["steps"] == list(range(DDP_STEPS))
    assert r0["records"]["layers"] == r1["records"]["layers"] == LAYERS  # DDP's "module." prefix unwrapped


def test_ddp_records_equal_single_process_reference(jobs: dict[str, Path], tmp_path: Path) -> None:
    got = [r for r in read_jsonl(jobs["ddp"] / "ddp.jsonl") if r["type"] == "metrics"]
    single = [r for r in single_process_records(tmp_path) if r["type"] == "metrics"]
    ref = reference(DDP_STEPS)
    assert [r["step"] for r in got] == [r["step"] for r in single]
    for g, s in zip(got, single):
        assert g["metrics"].keys() == s["metrics"].keys()
        for k, v in s["metrics"].items():
            if rank_local(k):  # rank 0's own batch (as Lightning logs a loss without sync_dist)
                continue
            assert_close(g["metrics"][k], v, what=f"step {g['step']} {k} vs single process")
        for k, v in ref[g["step"]]["metrics"].items():
            assert_close(g["metrics"][k], v, what=f"step {g['step']} {k} vs float64 reference")


def test_ddp_one_tiny_collective_per_step_only_when_skipping_needs_it(jobs: dict[str, Path]) -> None:
    for r in ranks(jobs["ddp"]):
        assert r["records"]["collectives"] == [1] * DDP_STEPS  # on_nonfinite="skip": the agreed flag
        assert r["warn"]["collectives"] == [0] * DDP_STEPS  # on_nonfinite="warn": none


def test_ddp_nan_on_one_rank_skips_the_step_on_both(jobs: dict[str, Path]) -> None:
    expected = [step == DDP_NAN_STEP for step in range(DDP_STEPS)]
    ref = reference(DDP_STEPS, skip=(DDP_NAN_STEP,))
    for r in ranks(jobs["ddp"]):
        nan = r["nan"]
        assert nan["skipped"] == expected
        assert nan["skipped_steps"] == 1
        assert nan["weights_equal"] == [True] * DDP_STEPS
        assert nan["weights_finite"] == [True] * DDP_STEPS
        assert_weights(nan["weights"], ref[-1]["weights"], f"rank {r['rank']} final weights")
    records = read_jsonl(jobs["ddp"] / "nan.jsonl")
    alerts = [r for r in records if r["type"] == "alert"]
    assert [(a["kind"], a["step"], a["layer"]) for a in alerts] == [("nonfinite", DDP_NAN_STEP, "2")]
    assert alerts[0]["message"].endswith("The step was skipped: no weight or optimizer state changed.")
    # Rank 0's own gradients were finite: the record still names the layer that was not, on rank 1.
    rec = next(r for r in records if r["type"] == "metrics" and r["step"] == DDP_NAN_STEP)
    assert rec["metrics"]["nonfinite/total"] == 1.0
    assert rec["metrics"]["nonfinite/2"] == 1.0
    assert rec["metrics"]["skipped_steps"] == 1.0


def test_fsdp1_flattened_parameters_are_warned_about_on_rank0(jobs: dict[str, Path]) -> None:
    from gradwatch.distributed import FSDP1_MESSAGE

    r0, r1 = ranks(jobs["ddp"])
    assert r0["fsdp1_warnings"] == [FSDP1_MESSAGE]
    assert r1["fsdp1_warnings"] == []
    assert FSDP1_MESSAGE.startswith("gradwatch: this model has parameters flattened by FullyShardedDataParallel")


# ---------------------------------------------------------------- FSDP2
def test_fsdp_local_shards_are_uneven_and_empty(jobs: dict[str, Path]) -> None:
    r0, r1 = ranks(jobs["fsdp"])
    assert r0["stats"]["local_shapes"] == [[4, 16], [4], [32, 7], [32], [1, 64], [1]]
    assert r1["stats"]["local_shapes"] == [[3, 16], [3], [32, 7], [32], [0, 64], [0]]


def test_fsdp_norms_equal_unsharded_reference(jobs: dict[str, Path]) -> None:
    records = read_jsonl(jobs["fsdp"] / "fsdp.jsonl")
    assert [r["type"] for r in records] == ["meta", "metrics", "metrics"]
    assert records[0]["layers"] == LAYERS
    ref = reference(FSDP_STEPS)
    metrics = records[1:]
    assert [r["step"] for r in metrics] == list(range(0, FSDP_STEPS, FSDP_LOG_EVERY))
    for rec in metrics:
        want = ref[rec["step"]]["metrics"]
        for k, v in want.items():  # per-layer L2, max |g| (empty shard on rank 1), param norms, total
            assert_close(rec["metrics"][k], v, what=f"step {rec['step']} {k}")
        for name in LAYERS:
            ratio = want[f"grad_norm/{name}"] / want[f"param_norm/{name}"]
            assert_close(rec["metrics"][f"grad_to_param/{name}"], ratio, what=f"grad_to_param/{name}")


def test_fsdp_one_all_reduce_per_statistic(jobs: dict[str, Path]) -> None:
    for r in ranks(jobs["fsdp"]):
        # Logging steps: sums of squares (+ the non-finite flag), max |g|, parameter norms;
        # other steps: the sums of squares only (the flag rides along: no separate agreement).
        assert r["stats"]["collectives"] == [3, 1, 3, 1]
        # Clipping on every (logging) step adds the post-clip norm.
        assert r["clip"]["collectives"] == [4] * FSDP_STEPS


def test_fsdp_clipping_to_a_global_threshold_matches_unsharded_clipping(jobs: dict[str, Path]) -> None:
    ref = reference(FSDP_STEPS, max_norm=MAX_NORM)
    for r in ranks(jobs["fsdp"]):
        for step, w in enumerate(r["clip"]["weights"]):
            assert_weights(w, ref[step]["weights"], f"rank {r['rank']} weights after step {step}")
    records = [r for r in read_jsonl(jobs["fsdp"] / "clip.jsonl") if r["type"] == "metrics"]
    assert [r["step"] for r in records] == list(range(FSDP_STEPS))
    for rec in records:
        want = ref[rec["step"]]["metrics"]
        assert want["grad_norm/total"] > MAX_NORM  # clipping is active
        assert_close(rec["metrics"]["grad_norm/total"], want["grad_norm/total"], what="pre-clip total")
        assert_close(rec["metrics"]["clip/coef"], MAX_NORM / (want["grad_norm/total"] + 1e-6), what="clip/coef")
        assert_close(rec["metrics"]["grad_norm_clipped/total"], want["grad_norm_clipped/total"], what="post-clip")


def test_fsdp_inf_norm_clipping_uses_the_global_max(jobs: dict[str, Path]) -> None:
    ref = reference(FSDP_STEPS, max_norm=0.02, norm_type=float("inf"))
    for step in range(FSDP_STEPS):
        assert max(v for k, v in ref[step]["metrics"].items() if k.startswith("grad_max/")) > 0.02  # active
    for r in ranks(jobs["fsdp"]):
        for step, w in enumerate(r["clip_inf"]["weights"]):
            assert_weights(w, ref[step]["weights"], f"rank {r['rank']} weights after step {step}")
        # Sums of squares + the global max for the clip; logging steps add max |g|, parameter
        # norms and the post-clip norm.
        assert r["clip_inf"]["collectives"] == [5, 2, 5, 2]


def test_fsdp_nan_in_one_local_shard_skips_on_both_ranks(jobs: dict[str, Path]) -> None:
    ref = reference(FSDP_STEPS, skip=(FSDP_NAN_STEP,))
    for r in ranks(jobs["fsdp"]):
        assert r["nan"]["skipped"] == [step == FSDP_NAN_STEP for step in range(FSDP_STEPS)]
        assert r["nan"]["finite"] is True
        assert_weights(r["nan"]["weights"][-1], ref[-1]["weights"], f"rank {r['rank']} final weights")


# ---------------------------------------------------------------- single process, no collectives
def test_single_process_plain_tensors_need_no_collective() -> None:
    model = nn.Linear(3, 2)
    monitor = gw.GradWatch(model, sinks=[])
    model(torch.ones(1, 3)).sum().backward()
    monitor.step()
    assert monitor._collector is not None
    gathered = monitor._collector.gather()
    assert gathered.reduce_keys == [()]
    assert gathered.sharded is False


def test_fsdp_agc_clips_whole_units_and_excludes_layers_by_name(jobs: dict[str, Path]) -> None:
    # FSDP2 shards weights by rows (output units), so each unit is whole on one rank; the
    # exclusion must hold although the local shards are new tensors every step.
    ref = reference(FSDP_STEPS, agc=(0.01, ("4",)))
    unclipped = reference(FSDP_STEPS)
    assert ref[0]["weights"] != unclipped[0]["weights"]  # AGC is active
    for r in ranks(jobs["fsdp"]):
        for step, w in enumerate(r["agc"]["weights"]):
            assert_weights(w, ref[step]["weights"], f"rank {r['rank']} AGC weights after step {step}")
