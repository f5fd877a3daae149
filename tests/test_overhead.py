"""Overhead you can leave on: host reads per step across configurations, bounded memory over
10,000 steps, and a smoke run of ``benchmarks/overhead.py`` at tiny sizes.

Speed itself is measured by the benchmark, not here: these tests count host reads, sizes and
records. (``tests/test_syncs.py`` covers the plain monitor and ``clip=Norm``; this file adds the
other clippers, granularities, attach(), real architectures, partial gradients, bf16, sinks and
the remaining ``on_nonfinite`` policies, and counts ``.cpu()`` too.)
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import tracemalloc
import warnings
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from _syncs import READBACK_METHODS, count_syncs
from torch import nn

import gradwatch as gw

ROOT = Path(__file__).resolve().parents[1]
# Every Tensor method that hands a value to the host (a host-device sync on a GPU).
_READS = (*READBACK_METHODS, "__index__", "cpu")


def count_reads():
    """Count every read back to the host, ``.cpu()`` and ``__index__`` included."""
    return count_syncs(_READS)


# ------------------------------------------------------------------------------------ models
class _Encoder(nn.Module):
    """A tiny pre-LN transformer encoder (embedding, attention, MLP, head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


class _ResNet(nn.Module):
    """A tiny ResNet-style CNN with BatchNorm, ReLU and a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head((y + self.block(y)).mean(dim=(2, 3)))


class _TwoBranch(nn.Module):
    """Only one branch runs per step: the set of parameters with a gradient changes every step."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 8)
        self.left = nn.Linear(8, 2)
        self.right = nn.Linear(8, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        branch = self.left if self.calls % 2 else self.right
        return branch(torch.relu(self.trunk(x)))


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)


def _loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    if isinstance(model, _Encoder):
        x = torch.randint(0, 50, (2, 6), generator=gen)
        return nn.functional.cross_entropy(model(x).reshape(-1, 50), x.reshape(-1))
    if isinstance(model, _ResNet):
        return model(torch.randn(2, 3, 8, 8, generator=gen)).square().mean()
    dtype = next(model.parameters()).dtype
    return model(torch.randn(4, 8, generator=gen).to(dtype)).float().square().mean()


def _reads_per_step(monitor: gw.GradWatch, model: nn.Module, steps: int) -> list[list[str]]:
    """Train ``steps`` steps calling ``monitor.step()``; the host reads each call made."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    per_step = []
    for _ in range(steps):
        _loss(model, gen).backward()
        with count_reads() as calls:
            monitor.step()
        per_step.append(list(calls))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return per_step


def _assert_reads(per_step: list[list[str]], log_every: int, non_logging: list[str]) -> None:
    for step, calls in enumerate(per_step):
        if step % log_every:
            assert calls == non_logging, f"step {step}: {calls}"
        else:
            # One transfer of one stacked tensor (.cpu() then .tolist()), after the skip check if any.
            assert calls == [*non_logging, "cpu", "tolist"], f"step {step}: {calls}"


CLIPS: dict[str, Callable[[], object]] = {
    "value": lambda: gw.clip.Value(0.1),
    "agc": lambda: gw.clip.AGC(),
    "zscore": lambda: gw.clip.ZScore(warmup=3),
    "percentile": lambda: gw.clip.Percentile(history=8),
}


@pytest.mark.parametrize("mode, expected", [("warn", []), ("ignore", []), ("skip", ["__bool__"]),
                                            ("raise", ["__bool__"])], ids=["warn", "ignore", "skip", "raise"])
@pytest.mark.parametrize("clip", list(CLIPS), ids=list(CLIPS))
def test_every_clipper_keeps_non_logging_steps_sync_free(clip: str, mode: str, expected: list[str]) -> None:
    model = _mlp()
    monitor = gw.GradWatch(model, sinks=[], on_nonfinite=mode, log_every=4, clip=CLIPS[clip]())
    _assert_reads(_reads_per_step(monitor, model, 10), 4, expected)
    monitor.close()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "transformer": lambda: _Encoder(),
    "resnet": lambda: _ResNet(),
    "partial-grads": lambda: _TwoBranch(),
    "bf16": lambda: _mlp(torch.bfloat16),
}


@pytest.mark.parametrize("granularity", ["module", "parameter"])
@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_architectures_granularities_and_activations(name: str, granularity: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    monitor = gw.GradWatch(model, sinks=[], on_nonfinite="warn", log_every=3, granularity=granularity,
                           track_activations=True, on_alert="ignore")
    _assert_reads(_reads_per_step(monitor, model, 8), 3, [])
    monitor.close()


def test_partial_gradients_switch_patterns_without_reads() -> None:
    # Which parameters have a gradient alternates; after both patterns are known, nothing is read.
    model = _TwoBranch()
    monitor = gw.GradWatch(model, sinks=[], on_nonfinite="warn", log_every=100)
    per_step = _reads_per_step(monitor, model, 6)
    assert per_step[0] == ["cpu", "tolist"]
    assert per_step[1:] == [[]] * 5
    assert len(monitor._collector._cache) == 2  # type: ignore[union-attr]
    monitor.close()


def test_sinks_read_nothing_on_non_logging_steps(tmp_path: Path) -> None:
    lines: list[str] = []
    model = _mlp()
    sinks = [gw.sinks.JSONL(tmp_path / "run.jsonl"), gw.sinks.Console(printer=lines.append)]
    monitor = gw.GradWatch(model, sinks=sinks, on_nonfinite="warn", log_every=5)
    _assert_reads(_reads_per_step(monitor, model, 11), 5, [])
    monitor.close()
    records = [json.loads(x) for x in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "metrics"] == [0, 5, 10]


@pytest.mark.parametrize("mode, expected", [("warn", []), ("skip", ["__bool__"])])
def test_attach_adds_only_the_policy_reads_to_optimizer_step(mode: str, expected: list[str]) -> None:
    # Through the optimizer's step pre-hook: the reads inside opt.step() are the monitor's only.
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = gw.watch(model, opt, sinks=[], on_nonfinite=mode, log_every=4)
    gen = torch.Generator().manual_seed(1)
    per_step = []
    for _ in range(9):
        _loss(model, gen).backward()
        with count_reads() as calls:
            opt.step()
        per_step.append(list(calls))
        opt.zero_grad(set_to_none=True)
    monitor.close()
    assert monitor.step_count == 9
    _assert_reads(per_step, 4, expected)


# --------------------------------------------------------------------------------- memory bounds
def _tensor_bytes(monitor: gw.GradWatch) -> tuple[int, int]:
    """Number and total bytes of the torch tensors the monitor holds (reachable from it).

    Walks the monitor's own objects (containers and gradwatch instances, not the model or the
    optimizer): counting every tensor of the process instead picks up what earlier tests and
    library threads leave alive, which says nothing about the monitor. Leaks elsewhere are caught
    by the heap check below.
    """
    gc.collect()
    seen: set[int] = set()
    found: dict[int, torch.Tensor] = {}
    stack: list[object] = [monitor]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found[id(o)] = o
        elif isinstance(o, (nn.Module, torch.optim.Optimizer)):
            continue
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset, deque)):
            stack.extend(o)
        elif type(o).__module__.startswith("gradwatch") and hasattr(o, "__dict__"):
            stack.extend(vars(o).values())
    return len(found), sum(t.numel() * t.element_size() for t in found.values())


def test_memory_stays_bounded_over_10000_steps(tmp_path: Path) -> None:
    """10,000 steps with NaN steps, alerts, logging, activation tracking, a history-keeping clipper
    and changing gradient patterns: every buffer keeps its configured bound, the same tensors stay
    alive, and Python's heap does not grow between step 9,000 and step 10,000."""
    torch.manual_seed(0)
    model = _TwoBranch()
    model.extra = nn.ReLU()  # a tracked activation that never runs
    monitor = gw.GradWatch(
        model,
        sinks=[gw.sinks.JSONL(tmp_path / "run.jsonl")],
        on_alert="ignore",
        log_every=2,
        track_activations=True,
        clip=gw.clip.Percentile(history=16),
        history_size=25,
        max_alerts=7,
        remind_every=1,  # every persisting condition is re-emitted: the alert list is always full
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 8)
    sizes: dict[int, tuple[int, ...]] = {}
    tensors: dict[int, tuple[int, int]] = {}
    heap: dict[int, int] = {}
    for step in range(10_000):
        model(x).square().mean().backward()
        if step % 5 == 3:
            model.trunk.weight.grad[0, 0] = float("nan")  # skipped, alerted
        monitor.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in (1_999, 7_999, 8_999, 9_999):
            log = monitor._alert_log
            sizes[step] = (
                len(monitor.history),
                len(monitor.alerts),
                len(log._last_emitted) + len(log._suppressed),
                len(monitor._collector._cache),  # type: ignore[union-attr]
                monitor.clip.state_dict()["buffer"].numel(),  # type: ignore[union-attr]
            )
            tensors[step] = _tensor_bytes(monitor)
            if step == 7_999:
                tracemalloc.start()
            elif step > 7_999:
                heap[step] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert monitor.skipped_steps == 2_000
    assert sizes[1_999] == sizes[7_999] == sizes[8_999] == sizes[9_999] == (25, 7, 1, 2, 16)
    assert {a.kind for a in monitor.alerts} == {"nonfinite"}
    assert tensors[1_999][0] > 50  # detector, clipper, tracker and cache tensors were all reached
    assert tensors[1_999] == tensors[7_999] == tensors[9_999]  # the same tensors alive, the same bytes
    # The ring buffers were refilled after tracing started, so both readings hold full buffers;
    # a leak of one small object per step would add >= 1,000 objects (>= 32 KiB) between them.
    assert abs(heap[9_999] - heap[8_999]) < 16 * 1024, heap
    monitor.close()
    lines = [json.loads(x) for x in (tmp_path / "run.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in lines if r["type"] == "metrics"]
    assert logged == [s for s in range(10_000) if s % 2 == 0 or s % 5 == 3]  # skipped steps are logged too


@pytest.mark.parametrize("history_size, max_alerts", [(1, 1), (3, 2)])
def test_history_and_alert_bounds_are_configurable(history_size: int, max_alerts: int) -> None:
    model = _mlp()
    monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=1, history_size=history_size,
                           max_alerts=max_alerts, remind_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    for _ in range(10):
        model(x).sum().backward()
        model[0].weight.grad[0, 0] = float("inf")
        monitor.step()
        opt.zero_grad(set_to_none=True)
    assert [h["step"] for h in monitor.history] == [float(s) for s in range(10 - history_size, 10)]
    assert [a.step for a in monitor.alerts] == list(range(10 - max_alerts, 10))
    monitor.close()


# --------------------------------------------------------------------------------- benchmark smoke
def _load_benchmark():
    spec = importlib.util.spec_from_file_location("gradwatch_bench_overhead", ROOT / "benchmarks" / "overhead.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_runs_at_tiny_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_benchmark()
    out = tmp_path / "overhead.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = bench.main(["--tiny", "--reps", "1", "--no-memory", "--threads", "1", "--json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert set(results["models"]) == {"mlp", "transformer", "cnn"}
    n_params = {"mlp": 14, "transformer": 18, "cnn": 29}  # parameter tensors of each tiny model
    for name, res in results["models"].items():
        v = res["variants"]
        assert list(v) == list(bench.VARIANTS)
        for key, e in v.items():
            for clock in ("cpu", "wall"):
                assert e[f"{clock}_step_ms"] > 0
                assert e[f"{clock}_ratio_q25"] <= e[f"{clock}_ratio"] <= e[f"{clock}_ratio_q75"]
            assert f"| {bench.LABELS[key]} |" in printed
        reads = {k: e["host_reads_per_step"] for k, e in v.items()}
        # 3 timed steps after step 0: none is a logging step for log_every=10 ...
        assert reads["bare"] == reads["floor"] == 0.0
        assert reads["default"] == reads["acts"] == reads["agc"] == 1.0  # the skip check
        assert reads["every1"] == 3.0  # skip check + one .cpu().tolist() transfer
        assert reads["naive"] == reads["lightning"] == n_params[name]
        assert reads["wandb"] >= n_params[name]
        sf = res["stats_vs_floor"]
        assert sf["n_grads"] == n_params[name]
        assert sf["floor_us"] > 0 and sf["stats_us"] > 0 and sf["stats_full_us"] > 0
    assert results["settings"]["reps"] == 1
    assert results["machine"]["torch"] == torch.__version__


def test_benchmark_memory_child_reports_peak_rss() -> None:
    bench = _load_benchmark()
    args = bench.parse_args(["--tiny", "--models", "mlp", "--variants", "default"])
    peak = bench.peak_rss("mlp", "default", args)
    # A fresh Python process that imported torch and trained: tens to hundreds of MiB.
    assert 20 < peak < 4096, peak


def test_benchmark_rejects_unknown_names() -> None:
    bench = _load_benchmark()
    with pytest.raises(ValueError, match=r"`--variants` entries must be one of bare, floor, .*; got 'tensorboard'"):
        bench.run(bench.parse_args(["--tiny", "--variants", "bare,tensorboard"]))


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU proof's every part on the CPU (ATen ops for launches, host reads for syncs): the promised sync
    counts hold (the script raises otherwise) and the JSON and the table say what was measured."""
    spec = importlib.util.spec_from_file_location("gradwatch_bench_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--models", "mlp,cnn", "--contenders", "floor,default,default_fused,warn,naive",
            "--chunks", "2", "--chunk", "3", "--json", str(out)]
    assert mod.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["units"] == {"launches": "ATen ops", "syncs": "Python-level host reads"}
    for name in ("mlp", "cnn"):
        c = res["models"][name]["contenders"]
        assert [c[k]["syncs_non_logging"] for k in ("floor", "default", "default_fused", "warn")] == [0, 1, 0, 0]
        n_params = sum(1 for _ in mod.build(name, True, torch.device("cpu")).model.parameters())
        assert c["naive"]["syncs_non_logging"] == n_params  # one .item() per gradient
        # _foreach_norm, stack, sum, and isfinite (abs, ne, eq, mul on CPU), whatever the depth.
        assert c["floor"]["launches_non_logging"] == 7
        assert 0 < c["warn"]["launches_non_logging"] <= 40  # tests/test_ops_per_step.py's bound
        for e in c.values():
            assert e["ratio_q25"] <= e["ratio"] <= e["ratio_q75"] and e["step_ms"] > 0
    printed = capsys.readouterr().out
    assert "| gradwatch default (skip), AdamW fused=True |" in printed and f"wrote {out}" in printed
    with pytest.raises(SystemExit, match="no CUDA device here") if not torch.cuda.is_available() else nullcontext():
        mod.parse_args([])
