"""The device-side skip: fused optimizers skip a poisoned step through ``found_inf``, with no sync.

A NaN gradient at step ``K``: the run with gradwatch must leave parameters and every optimizer
state tensor bit-identical to a run that never saw that batch, raise exactly one ``nonfinite``
alert naming step ``K``, and read nothing back on non-logging steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.sinks.jsonl import read_jsonl
from tests._syncs import count_syncs

STEPS = 10
K = 5  # the poisoned step
LOG_EVERY = 4


def model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]
    return model, data


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters and every optimizer state tensor (step counts included), cloned."""
    state = [v.detach().clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()], state


def bit_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "fused AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True),
    "fused SGD": lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, fused=True),
    "Adam (not fused)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
}


def reference(make_opt: Callable[[nn.Module], torch.optim.Optimizer]) -> list[tuple[list, list]]:
    """The same training without gradwatch, batch ``K`` never seen: snapshots after each step."""
    model, data = model_and_data()
    opt = make_opt(model)
    out = []
    for step, (x, y) in enumerate(data):
        if step != K:
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append(snapshot(model, opt))
    return out


def watched(make_opt: Callable[[nn.Module], torch.optim.Optimizer], tmp_path: Path):
    model, data = model_and_data()
    opt = make_opt(model)
    monitor = gw.GradWatch(model, sinks=[gw.sinks.JSONL(tmp_path / "run.jsonl")], log_every=LOG_EVERY,
                           on_alert="ignore")
    snaps, reports, reads = [], [], []
    for step, (x, y) in enumerate(data):
        F.mse_loss(model(x), y).backward()
        if step == K:
            with torch.no_grad():
                model[2].weight.grad[3, 4] = float("nan")
        with count_syncs() as syncs:
            reports.append(monitor.step(optimizer=opt))
        reads.append(list(syncs))
        opt.step()
        opt.zero_grad(set_to_none=True)
        snaps.append(snapshot(model, opt))
    monitor.close()
    return monitor, opt, snaps, reports, reads


@pytest.mark.parametrize("name", ["fused AdamW", "fused SGD"])
def test_fused_optimizer_skips_on_the_device_bit_identically_without_a_read(name: str, tmp_path: Path) -> None:
    make_opt = OPTIMIZERS[name]
    ref = reference(make_opt)
    monitor, opt, snaps, reports, reads = watched(make_opt, tmp_path)
    assert monitor.skip_mode == "device"
    for step in range(STEPS):
        assert bit_equal(snaps[step][0], ref[step][0]), f"parameters differ after step {step}"
        assert bit_equal(snaps[step][1], ref[step][1]), f"optimizer state differs after step {step}"
    # Zero host reads on non-logging steps, the poisoned one included.
    assert [r for s, r in enumerate(reads) if s % LOG_EVERY != 0] == [[]] * (STEPS - 3)
    # What is known at each step: None on non-logging steps (decided on the device), read on logging ones.
    assert [r.skipped for r in reports] == [False, None, None, None, False, None, None, None, False, None]
    assert monitor.skipped_steps == 1
    assert [(a.kind, a.step, a.layer) for a in monitor.alerts] == [("nonfinite", K, "2")]
    assert monitor.alerts[0].message.endswith("The step was skipped: no weight or optimizer state changed.")
    assert not hasattr(opt, "found_inf")  # taken back after the step
    records = read_jsonl(tmp_path / "run.jsonl")
    assert records[0]["skip"] == "device"
    metrics = [r for r in records if r["type"] == "metrics"]
    assert [(r["step"], r["metrics"]["skipped_steps"]) for r in metrics] == [(0, 0.0), (4, 0.0), (8, 1.0)]
    assert [(r["type"], r["step"]) for r in records if r["type"] == "alert"] == [("alert", K)]


def test_optimizer_that_cannot_skip_on_the_device_keeps_the_one_read_path(tmp_path: Path) -> None:
    make_opt = OPTIMIZERS["Adam (not fused)"]
    ref = reference(make_opt)
    monitor, opt, snaps, reports, reads = watched(make_opt, tmp_path)
    assert monitor.skip_mode == "host"
    for step in range(STEPS):
        assert bit_equal(snaps[step][0], ref[step][0]), f"parameters differ after step {step}"
        assert bit_equal(snaps[step][1], ref[step][1]), f"optimizer state differs after step {step}"
    assert [len(r) for s, r in enumerate(reads) if s % LOG_EVERY != 0 and s != K] == [1] * 6  # the flag
    assert [r.skipped for r in reports] == [s == K for s in range(STEPS)]
    assert read_jsonl(tmp_path / "run.jsonl")[0]["skip"] == "host"
    assert [(a.kind, a.step) for a in monitor.alerts] == [("nonfinite", K)]


def test_attached_monitor_combines_its_flag_with_a_grad_scalers(tmp_path: Path) -> None:
    """Under ``scaler.step(opt)`` the scaler sets ``found_inf`` before the step pre-hook runs; the
    monitor (not told of the scaler) takes the maximum with its own flag and leaves the scaler's
    attribute for the scaler to remove."""
    model, data = model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(float(o.found_inf)))  # after gradwatch's hook
    with gw.watch(model, opt, sinks=[], log_every=100, on_alert="ignore") as monitor:
        for step, (x, y) in enumerate(data):
            scaler.scale(F.mse_loss(model(x), y)).backward()
            if step == K:
                with torch.no_grad():
                    model[2].weight.grad[3, 4] = float("nan")
            before = snapshot(model, opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            after = snapshot(model, opt)
            assert bit_equal(before[0], after[0]) == (step == K)
            assert bit_equal(before[1], after[1]) == (step == K)
            assert not hasattr(opt, "found_inf")
    assert monitor.skip_mode == "device"
    assert seen == [1.0 if s == K else 0.0 for s in range(STEPS)]
    assert [(a.kind, a.step) for a in monitor.alerts] == [("nonfinite", K)]


def test_ddp_two_ranks_nan_on_one_rank_both_skip_on_the_device(tmp_path: Path) -> None:
    script = Path(__file__).parent / "scripts" / "dist_device_skip.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["skip_mode"] == "device"
        # One all-reduce per step (the non-finite flags, max over ranks, on the device); no read
        # except on logging steps (0 and 4).
        assert r["collectives"] == [1] * 8
        assert [n for s, n in enumerate(r["reads"]) if s % 4 != 0] == [0] * 6
        assert r["skipped"] == [False, None, None, None, False, None, None, None]
        assert r["weights_equal"] == [True] * 8 and r["weights_finite"] == [True] * 8
        assert r["skipped_steps"] == 1
        assert r["adam_steps"] == [7.0] * 6  # 8 steps, one skipped on both ranks
        assert r["found_inf_left"] is False
    records = read_jsonl(tmp_path / "skip.jsonl")
    assert [(x["type"], x.get("step")) for x in records if x["type"] == "alert"] == [("alert", 3)]
