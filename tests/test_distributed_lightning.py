"""Lightning strategies with GradWatchCallback on 2 CPU processes (gloo): ``strategy="ddp"`` and
FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) give the same records as a single-process run
on the same global batches, written by rank 0 alone, one per optimizer step.

Lightning re-launches its command line for rank 1, so each run is ``tests/scripts/dist_lightning.py``
in a subprocess with a time-out (never Lightning's re-launch of pytest itself); the three runs
start together to share the import time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.sinks.jsonl import read_jsonl

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import dist_common as C  # noqa: E402

pytest.importorskip("lightning", reason="Lightning is installed in CI (dev extra)")

TIMEOUT_S = 300
STEPS = 4
LAYERS = ["net.0", "net.2", "net.4"]
MODES = ("single", "ddp", "fsdp2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {mode: tmp_path_factory.mktemp(mode) for mode in MODES}
    procs = {}
    for mode, d in dirs.items():
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).parents[1]),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(C.free_port()),
        }
        procs[mode] = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "dist_lightning.py"), mode, str(d)],
            cwd=str(d),  # Lightning may write lightning_logs/ next to the working directory
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
    for mode, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"dist_lightning.py {mode} timed out after {TIMEOUT_S}s:\n{out.decode()[-3000:]}")
        assert proc.returncode == 0, f"dist_lightning.py {mode} failed:\n{out.decode()[-3000:]}"
    return dirs


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_rank0_writes_one_record_per_optimizer_step(runs: dict[str, Path], mode: str) -> None:
    records = read_jsonl(runs[mode] / "records.jsonl")
    assert [r["type"] for r in records] == ["meta"] + ["metrics"] * STEPS
    assert records[0]["layers"] == LAYERS
    assert [r["step"] for r in records[1:]] == list(range(STEPS))
    infos = [json.loads((runs[mode] / f"rank{r}.json").read_text()) for r in range(C.WORLD)]
    # Both ranks ran a monitor for every step; only rank 0's records reached the shared file.
    assert infos == [{"layers": LAYERS, "steps": STEPS, "world_size": C.WORLD}] * C.WORLD


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_records_equal_the_single_process_run(runs: dict[str, Path], mode: str) -> None:
    got = [r for r in read_jsonl(runs[mode] / "records.jsonl") if r["type"] == "metrics"]
    single = [r for r in read_jsonl(runs["single"] / "records.jsonl") if r["type"] == "metrics"]
    ref = C.reference(STEPS, prefix="net.")
    assert len(got) == len(single) == STEPS
    for g, s in zip(got, single):
        assert g["step"] == s["step"]
        assert g["metrics"].keys() == s["metrics"].keys()
        for k, v in s["metrics"].items():
            if k == "loss" or k.startswith("input/"):
                # Rank 0's own batch: its loss (the training_step loss, as Lightning logs it without
                # sync_dist) and its input scale are not the global batch's.
                assert math.isfinite(g["metrics"][k]) and g["metrics"][k] > 0, k
                continue
            if mode == "fsdp2" and k.startswith("update_ratio/"):
                # Estimated from a strided sample of the weights: of the local shards under FSDP2.
                assert g["metrics"][k] == pytest.approx(v, rel=0.25), f"step {g['step']} {k}"
                continue
            assert g["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), f"step {g['step']} {k}"
        for k, v in ref[g["step"]]["metrics"].items():  # and both equal the float64 reference
            assert g["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), f"step {g['step']} {k} (float64)"
