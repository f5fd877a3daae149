"""Overhead of gradwatch against the bare training loop and against peer tools.

Every configuration ("variant") is timed in the same process as the bare loop, interleaved.
For each repetition and each variant (in an order shuffled per repetition) the model is restored
to the same initial weights with a fresh optimizer, ``--warmup`` untimed steps run, then
``--chunks`` timed chunks of ``--chunk`` steps of the variant alternate with as many steps of
the bare loop on the same model: step by step on CPU (B V B V ..., then V B V B ... in the next
chunk), chunk by chunk on CUDA (B V V B ..., synchronizing only at chunk boundaries). The variant
is simply not called during bare steps, and its own step count runs on; forward hooks
(``acts``) are taken out around bare steps, outside the timed region. ``wandb`` hooks every
parameter's gradient: it runs a bare block and then a block of its own. A chunk's
time divided by its steps is one sample, so with ``--chunk 10`` every sample holds exactly one
gradwatch logging step (``log_every=10``) and the logging cost is not hidden by the median.
Each variant chunk's ratio to the bare chunk it alternated with is one ratio; the table shows
the median and the quartiles of those ratios over all repetitions.

Two clocks: wall time, and this process's CPU time (``time.process_time``). With one intra-op
thread (``--threads 1``, the default) the CPU time is the work done, and it is far less
disturbed by other processes on a shared machine than the wall time; on CUDA only the wall
time (around ``torch.cuda.synchronize``) means anything.

Allocator (CPU): ``--malloc steady`` (the default from the command line) sets glibc's trim and mmap
thresholds to 1 GiB, so freed memory stays mapped and reused. With glibc's adaptive defaults, whether a
backward page-faults its ~22 MiB of gradients afresh depends on where earlier small allocations fell in
the heap, and in an interleaved comparison one configuration pays for the layout another left
(see :func:`steady_malloc`); ``--malloc default`` measures with glibc as configured.

Variants: ``bare``; gradwatch ``default`` (``log_every=10``), ``every1`` (``log_every=1``),
``acts`` (``track_activations=True``), ``agc`` (``clip=gw.clip.AGC()``); each gradwatch
variant writes its records to a JSONL file in a temporary folder. Peers: ``wandb``
(``wandb.watch(model, log="gradients", log_freq=1)`` in an offline run), ``lightning``
(``lightning.pytorch.utilities.grads.grad_norm(model, 2)`` every step) and ``naive``
(``[p.grad.norm().item() for p in params]`` every step).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over each variant's block; on CPU,
the peak resident set size (``VmHWM``) of a fresh child process per (model, variant) that
imports, builds and runs only that variant.

It also times the statistics alone (``StatsCollector.gather`` + ``compute`` of a non-logging
step) against the floor: one ``torch._foreach_norm`` pass over the same gradients (every
gradient byte read once) and a finiteness check of their sum, left on the device.

Usage::

    python benchmarks/overhead.py                        # full run (several minutes on 2 cores)
    python benchmarks/overhead.py --tiny --reps 1        # seconds: the smoke test's sizes
    python benchmarks/overhead.py --models mlp --variants default,every1 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch as gw
from gradwatch.detectors import StepEvidence
from gradwatch.stats import StatsCollector

VARIANTS = ("bare", "floor", "default", "every1", "acts", "agc", "wandb", "lightning", "naive")
MODELS = ("mlp", "transformer", "cnn")
LABELS = {
    "bare": "bare loop",
    "floor": "floor: one _foreach_norm pass + finiteness check per step",
    "default": "gradwatch default (log_every=10)",
    "every1": "gradwatch log_every=1",
    "acts": "gradwatch track_activations=True",
    "agc": "gradwatch clip=AGC()",
    "wandb": 'wandb.watch(log="gradients", log_freq=1)',
    "lightning": "Lightning grad_norm(model, 2)",
    "naive": "naive p.grad.norm().item() loop",
}


# --------------------------------------------------------------------------------------- models
@dataclass
class Workload:
    """A model, its optimizer factory, a fixed batch and the loss."""

    name: str
    model: nn.Module
    make_opt: Callable[[nn.Module], torch.optim.Optimizer]
    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    describe: str
    initial: dict[str, Tensor] = field(default_factory=dict)

    def reset(self) -> torch.optim.Optimizer:
        """Restore the initial weights and return a fresh optimizer."""
        self.model.load_state_dict(self.initial)
        for p in self.model.parameters():
            p.grad = None
        return self.make_opt(self.model)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.short(x))


class _ResNet(nn.Module):
    def __init__(self, width: int, blocks: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        c = width
        for stage in range(3):
            c_out = width * 2**stage
            for b in range(blocks):
                layers.append(_Block(c, c_out, 2 if (b == 0 and stage > 0) else 1))
                c = c_out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


class _Encoder(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(self.embed(x) + self.pos)))


def build(name: str, args: argparse.Namespace, device: torch.device) -> Workload:
    """Build one of :data:`MODELS` at the sizes in ``args`` (seeded: identical on every call)."""
    torch.manual_seed(0)
    if name == "mlp":
        w, d, b = args.mlp_width, args.mlp_depth, args.batch
        mods: list[nn.Module] = []
        for _ in range(d):
            mods += [nn.Linear(w, w), nn.LayerNorm(w), nn.GELU()]
        model = nn.Sequential(*mods, nn.Linear(w, 10))
        x, y = torch.randn(b, w), torch.randint(0, 10, (b,))
        wl = Workload(name, model, lambda m: torch.optim.SGD(m.parameters(), lr=1e-2), x, y,
                      nn.functional.cross_entropy, f"{d}-layer MLP width {w}, LayerNorm+GELU, batch {b}, SGD")
    elif name == "transformer":
        d, n, s, b = args.tf_width, args.tf_layers, args.tf_seq, args.tf_batch
        vocab = 1000
        model = _Encoder(vocab, d, n, max(1, d // 32), s)
        x, y = torch.randint(0, vocab, (b, s)), torch.randint(0, vocab, (b, s))
        wl = Workload(name, model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), x, y,
                      lambda out, t: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1)),
                      f"pre-LN transformer encoder, {n} layers d={d}, seq {s}, batch {b}, AdamW")
    elif name == "cnn":
        c, k, r, b = args.cnn_width, args.cnn_blocks, args.cnn_res, args.cnn_batch
        model = _ResNet(c, k)
        x, y = torch.randn(b, 3, r, r), torch.randint(0, 10, (b,))
        wl = Workload(name, model, lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9), x, y,
                      nn.functional.cross_entropy,
                      f"ResNet-style CNN, 3 stages x {k} blocks, width {c}, {r}x{r} input, batch {b}, SGD+momentum")
    else:
        raise ValueError(f"`--models` entries must be one of {', '.join(MODELS)}; got {name!r}")
    wl.model.to(device)
    wl.inputs, wl.targets = wl.inputs.to(device), wl.targets.to(device)
    wl.initial = copy.deepcopy(wl.model.state_dict())
    return wl


# ------------------------------------------------------------------------------------- variants
_RUNS = itertools.count()  # each monitor writes a file of its own


class Variant:
    """Something done to each training step: set up, a call after backward, torn down."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.tmp = tmp
        self.note = ""
        self._monitor: gw.GradWatch | None = None
        self._after: Callable[[], Any] | None = None
        self._model: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        """Attach to ``model``."""
        self._model = model
        n = self.name
        if n in ("default", "every1", "acts", "agc"):
            sink = gw.sinks.JSONL(self.tmp / f"{n}-{next(_RUNS)}.jsonl")
            kw: dict[str, Any] = {"sinks": [sink], "on_alert": "ignore"}
            if n == "every1":
                kw["log_every"] = 1
            elif n == "acts":
                kw["track_activations"] = True
            elif n == "agc":
                agc = getattr(gw.clip, "AGC", None)
                if agc is None:  # not landed yet: measure the clipping that exists
                    kw["clip"] = gw.clip.Norm(1.0)
                    self.note = "AGC not available; measured clip=Norm(1.0)"
                else:
                    kw["clip"] = agc()
            self._monitor = gw.GradWatch(model, **kw)
            self._after = self._monitor.step
        elif n == "wandb":
            _wandb_run(self.tmp).watch(model, log="gradients", log_freq=1)
        elif n == "lightning":
            from lightning.pytorch.utilities.grads import grad_norm

            self._after = lambda: grad_norm(model, 2)
        elif n == "floor":
            params = [p for p in model.parameters() if p.requires_grad]
            self._after = lambda: floor_check([p.grad for p in params if p.grad is not None])
        elif n == "naive":
            params = [p for p in model.parameters() if p.requires_grad]
            self._after = lambda: [p.grad.norm().item() for p in params if p.grad is not None]
        elif n != "bare":
            raise ValueError(f"`--variants` entries must be one of {', '.join(VARIANTS)}; got {n!r}")

    def after_backward(self) -> None:
        """Run between ``backward()`` and ``optimizer.step()``."""
        if self._after is not None:
            self._after()

    def teardown(self) -> None:
        """Detach from the model (every hook removed)."""
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self.name == "wandb" and self._model is not None:
            _wandb_run(self.tmp).unwatch(self._model)
        self._after = None
        self._model = None


_WANDB: Any = None


def _wandb_run(tmp: Path) -> Any:
    global _WANDB
    if _WANDB is None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        _WANDB = wandb.init(mode="offline", dir=str(tmp), project="gradwatch-overhead", reinit="finish_previous")
    return _WANDB


def _finish_wandb() -> None:
    global _WANDB
    if _WANDB is not None:
        _WANDB.finish()
        _WANDB = None


def floor_check(grads: list[Tensor]) -> Tensor:
    """The floor: one ``_foreach_norm`` read of every gradient and a finiteness check (on the device, not read)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())


# --------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(wl: Workload, opt: torch.optim.Optimizer, variant: Variant) -> None:
    """One optimizer step of the workload with the variant's work after backward."""
    opt.zero_grad(set_to_none=True)
    loss = wl.loss_fn(wl.model(wl.inputs), wl.targets)
    loss.backward()
    variant.after_backward()
    opt.step()


# Variants that install gradient hooks: their bare steps cannot run in the same block, so they are
# timed in a block of their own right after a bare block. (The forward hooks of ``acts`` are
# switched off around its bare steps instead, outside the timed region.)
HOOKED = ("wandb",)


@contextlib.contextmanager
def _forward_hooks_off(model: nn.Module, off: bool) -> Iterator[None]:
    """Take every module's forward hooks out for a bare step (and put them back)."""
    saved = [(m, m._forward_hooks) for m in model.modules() if m._forward_hooks] if off else []
    for m, _ in saved:
        m._forward_hooks = OrderedDict()
    try:
        yield
    finally:
        for m, hooks in saved:
            m._forward_hooks = hooks


def _time_chunk(wl: Workload, opt: torch.optim.Optimizer, variant: Variant, n: int,
                device: torch.device) -> tuple[float, float]:
    """Seconds per step of ``n`` steps, by wall clock and by this process's CPU time."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        train_step(wl, opt, variant)
    _sync(device)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def run_block(
    wl: Workload, variant: Variant, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """Time the bare loop and ``variant`` in alternating chunks.

    Returns the bare and the variant chunk samples (seconds per step, ``"wall"`` and ``"cpu"``
    clocks) and the peak CUDA memory of the variant. Variants whose work is one call after
    backward alternate with the bare loop on one model, step by step on CPU and chunk by chunk
    on CUDA: the variant simply is not called during bare steps, and its own step count, hence
    its logging cadence, runs on. Hooked variants (:data:`HOOKED`) run a bare block and then
    their own block.
    """
    bare = Variant("bare", variant.tmp)
    out_b: dict[str, list[float]] = {"wall": [], "cpu": []}
    out_v: dict[str, list[float]] = {"wall": [], "cpu": []}
    # Warm-up in whole chunks, so every timed chunk of the variant holds the same logging steps.
    warm = -(-args.warmup // args.chunk) * args.chunk
    peak = 0

    def record(out: dict[str, list[float]], t: tuple[float, float]) -> None:
        out["wall"].append(t[0])
        out["cpu"].append(t[1])

    if variant.name in HOOKED:
        opt = wl.reset()
        for _ in range(warm):
            train_step(wl, opt, bare)
        for _ in range(args.chunks):
            record(out_b, _time_chunk(wl, opt, bare, args.chunk, device))
    opt = wl.reset()
    variant.setup(wl.model)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warm):
            train_step(wl, opt, variant)
            if variant.name not in HOOKED:
                with _forward_hooks_off(wl.model, True):
                    train_step(wl, opt, bare)
        for i in range(args.chunks):
            if variant.name in HOOKED:
                record(out_v, _time_chunk(wl, opt, variant, args.chunk, device))
                continue
            order = (bare, variant) if i % 2 == 0 else (variant, bare)
            if device.type == "cpu":
                # Step by step (B V B V ... then V B V B ...): neighbouring steps see the same
                # machine load, so the pairs cancel most of what other processes do.
                sums = {bare: [0.0, 0.0], variant: [0.0, 0.0]}
                for _ in range(args.chunk):
                    for who in order:
                        with _forward_hooks_off(wl.model, who is bare):
                            t = _time_chunk(wl, opt, who, 1, device)
                        sums[who][0] += t[0]
                        sums[who][1] += t[1]
                record(out_b, (sums[bare][0] / args.chunk, sums[bare][1] / args.chunk))
                record(out_v, (sums[variant][0] / args.chunk, sums[variant][1] / args.chunk))
                continue
            for who in order:
                with _forward_hooks_off(wl.model, who is bare):
                    record(out_b if who is bare else out_v, _time_chunk(wl, opt, who, args.chunk, device))
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    finally:
        variant.teardown()
    return out_b, out_v, peak


def _bare_peak(wl: Workload, args: argparse.Namespace, device: torch.device) -> int:
    """Peak CUDA memory of the bare loop alone."""
    bare = Variant("bare", Path("."))
    opt = wl.reset()
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup + args.chunk):
        train_step(wl, opt, bare)
    _sync(device)
    return torch.cuda.max_memory_allocated(device)


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[int]]:
    """Count Python-level tensor-to-host reads (``.item()``, ``.tolist()``, ``bool(t)``, ...).

    On a GPU each is a host-device sync. Conversions done inside C++ (``torch.tensor`` of a list
    of tensors, as Lightning's ``grad_norm`` does) are not seen, so this is a lower bound.
    """
    counter = [0]
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Tensor, *a: Any, **k: Any) -> Any:
            counter[0] += 1
            return orig(self, *a, **k)

        return counted

    for n, f in saved.items():
        setattr(torch.Tensor, n, wrap(f))
    try:
        yield counter
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def host_reads_per_step(wl: Workload, variant: Variant, steps: int) -> float:
    """Average host reads per step done by the variant's own work (backward hooks included)."""
    opt = wl.reset()
    variant.setup(wl.model)
    try:
        train_step(wl, opt, variant)  # step 0: binding and the first logging step
        total = 0
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = wl.loss_fn(wl.model(wl.inputs), wl.targets)
            with count_host_reads() as c:
                loss.backward()
                variant.after_backward()
            total += c[0]
            opt.step()
    finally:
        variant.teardown()
    return total / steps


# ------------------------------------------------------------------------------------ op counts
class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active (each is a kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(wl: Workload, variant: Variant, log_every: int = 10) -> tuple[int, int]:
    """ATen ops of a whole iteration with the variant minus the bare iteration, on a non-logging and
    on a logging step of gradwatch's cadence (the same for peers, which do the same every step)."""

    def iteration_ops(v: Variant, step: int) -> int:
        opt = wl.reset()
        v.setup(wl.model)
        try:
            for _ in range(step):
                train_step(wl, opt, v)
            with _OpCounter() as c:
                train_step(wl, opt, v)
        finally:
            v.teardown()
        return c.n

    out = []
    for step in (log_every + 3, log_every):  # a non-logging step, then a logging one
        out.append(iteration_ops(variant, step) - iteration_ops(Variant("bare", variant.tmp), step))
    return out[0], out[1]


# --------------------------------------------------------------------------- statistics vs floor
def stats_vs_floor(wl: Workload, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median microseconds of the statistics alone and of the floor (:func:`floor_check`), interleaved."""
    opt = wl.reset()
    wl.loss_fn(wl.model(wl.inputs), wl.targets).backward()
    probe = gw.GradWatch(wl.model, sinks=[], detectors=None, on_nonfinite="warn")
    probe.step()  # binds: layers in forward order
    collector = StatsCollector(probe._layers)
    probe.close()
    grads = [p.grad for p in wl.model.parameters() if p.grad is not None]
    del opt

    def floor() -> None:
        floor_check(grads)

    def stats() -> None:
        collector.compute(collector.gather(), 1, full=False)

    def stats_full() -> None:
        collector.compute(collector.gather(), 0, full=True)

    # The whole trip of monitor.step() on the same gradients, and the default detectors alone.
    tmp = tempfile.TemporaryDirectory()
    quiet: dict[str, Any] = {"sinks": [], "on_alert": "ignore", "log_every": 10**9}
    warn = gw.GradWatch(wl.model, on_nonfinite="warn", **quiet)
    skip = gw.GradWatch(wl.model, on_nonfinite="skip", **quiet)
    logging = gw.GradWatch(wl.model, sinks=[gw.sinks.JSONL(Path(tmp.name) / "t.jsonl")], on_alert="ignore",
                           log_every=1)
    for m in (warn, skip):
        m.step()  # step 0 (binding, logging); the timed calls are non-logging steps
    fixed = collector.compute(collector.gather(), 1, full=False)

    def detectors() -> None:
        ev = StepEvidence(stats=fixed, step=warn._step_t)  # what the monitor hands them each step
        for d in warn.detectors:
            d.update(ev)

    fns = {"floor": floor, "stats": stats, "stats_full": stats_full, "detectors": detectors,
           "trip_warn": warn.step, "trip_skip": skip.step, "trip_logging": logging.step}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    order = list(fns)
    # CPU time on CPU (robust to other processes on a shared machine); wall time around syncs on CUDA
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    for _ in range(args.stats_reps):
        random.shuffle(order)
        for k in order:
            _sync(device)
            t0 = clock()
            for _ in range(args.stats_calls):
                fns[k]()
            _sync(device)
            samples[k].append((clock() - t0) / args.stats_calls * 1e6)
    for m in (warn, skip, logging):
        m.close()
    tmp.cleanup()
    out = {f"{k}_us": statistics.median(v) for k, v in samples.items()}
    out["stats_over_floor"] = out["stats_us"] / out["floor_us"]
    out["n_grads"] = len(grads)
    out["grad_mib"] = sum(g.numel() * g.element_size() for g in grads) / 2**20
    return out


# ------------------------------------------------------------------------------------ memory (CPU)
def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _size_flags(args: argparse.Namespace) -> list[str]:
    keys = ("mlp_width", "mlp_depth", "batch", "tf_width", "tf_layers", "tf_seq", "tf_batch",
            "cnn_width", "cnn_blocks", "cnn_res", "cnn_batch", "warmup", "chunk", "threads", "malloc")
    out = []
    for k in keys:
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out


def memory_child(args: argparse.Namespace) -> None:
    """Child process: run one (model, variant) and print its peak RSS as JSON."""
    device = torch.device(args.device)
    wl = build(args.models.split(",")[0], args, device)
    name = args.variants.split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        variant = Variant(name, Path(tmp))
        opt = wl.reset()
        variant.setup(wl.model)
        for _ in range(args.warmup + args.chunk * 2):
            train_step(wl, opt, variant)
        variant.teardown()
        _finish_wandb()
    print(json.dumps({"peak_rss_mib": _vm_hwm_mib()}))


def peak_rss(model: str, variant: str, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a fresh process that runs only this (model, variant)."""
    cmd = [sys.executable, __file__, "--memory-child", "--models", model, "--variants", variant, *_size_flags(args)]
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory child {model}/{variant} failed:\n{res.stderr[-2000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"])


# ------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison once per ``--threads`` entry; ``models`` holds the first, ``runs`` every one."""
    runs = []
    for t in args.thread_list:
        args.threads = t
        runs.append(run_threads(args))
    out = dict(runs[0])
    out["runs"] = [
        {"threads": t, "models": r["models"], "machine": r["machine"]} for t, r in zip(args.thread_list, runs)
    ]
    out["settings"] = {**out["settings"], "threads": list(args.thread_list)}
    return out


def run_threads(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole comparison with ``args.threads`` intra-op threads and return the JSON-ready results."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    random.seed(0)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"`--variants` entries must be one of {', '.join(VARIANTS)}; got {v!r}")
    others = [v for v in variants if v != "bare"]
    results: dict[str, Any] = {
        "machine": machine(device),
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "memory_child", "thread_list")},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for mname in [m for m in args.models.split(",") if m]:
            wl = build(mname, args, device)
            res: dict[str, Any] = {"describe": wl.describe, "params": sum(p.numel() for p in wl.model.parameters()),
                                   "variants": {}}
            clocks = ("cpu", "wall")
            # per variant and clock: chunk samples (seconds/step), and each chunk's ratio to the bare
            # chunk it alternated with
            step_s: dict[str, dict[str, list[float]]] = {v: {c: [] for c in clocks} for v in ["bare", *others]}
            ratios: dict[str, dict[str, list[float]]] = {v: {c: [] for c in clocks} for v in others}
            peaks: dict[str, list[int]] = {v: [] for v in others}
            notes: dict[str, str] = {}
            for rep in range(args.reps):
                order = list(others)
                random.shuffle(order)
                for v in order:
                    var = Variant(v, tmp)
                    base, got, peak = run_block(wl, var, args, device)
                    if var.note:
                        notes[v] = var.note
                    for c in clocks:
                        step_s["bare"][c] += base[c]
                        step_s[v][c] += got[c]
                        ratios[v][c] += [x / b for x, b in zip(got[c], base[c])]
                    peaks[v].append(peak)
                print(f"  [{mname}] repetition {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
            for v in ["bare", *others]:
                if not step_s[v]["cpu"]:
                    continue
                entry: dict[str, Any] = {}
                for c in clocks:
                    entry[f"{c}_step_ms"] = statistics.median(step_s[v][c]) * 1e3
                    r = ratios[v][c] if v != "bare" else [1.0]
                    entry[f"{c}_ratio"] = statistics.median(r)
                    entry[f"{c}_ratio_q25"], entry[f"{c}_ratio_q75"] = _quartiles(r)
                    if v != "bare":
                        entry[f"{c}_ratios"] = r
                if v in notes:
                    entry["note"] = notes[v]
                if device.type == "cuda":
                    entry["peak_mib"] = (max(peaks[v]) if v != "bare" else _bare_peak(wl, args, device)) / 2**20
                res["variants"][v] = entry
            floor = res["variants"].get("floor")
            for v in ["bare", *others]:
                if v not in res["variants"]:
                    continue
                entry = res["variants"][v]
                if floor is not None:
                    for c in clocks:  # the same-run ratio to the floor loop (both alternated with bare)
                        entry[f"{c}_vs_floor"] = entry[f"{c}_ratio"] / floor[f"{c}_ratio"]
                if args.ops and v != "bare":
                    entry["ops_non_logging"], entry["ops_logging"] = ops_per_step(wl, Variant(v, tmp))
                if device.type != "cuda" and args.memory:
                    entry["peak_mib"] = peak_rss(mname, v, args)
                if args.host_reads:
                    entry["host_reads_per_step"] = host_reads_per_step(wl, Variant(v, tmp), args.chunk)
            if args.stats_reps > 0:
                res["stats_vs_floor"] = stats_vs_floor(wl, args, device)
            results["models"][mname] = res
            _finish_wandb()
    return results


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def machine(device: torch.device) -> dict[str, Any]:
    """Where the figures were measured."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradwatch": gw.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(results: dict[str, Any]) -> str:
    """A Markdown table: step-time ratio to the bare loop, peak memory, host reads per step."""
    lines = []
    runs = results.get("runs") or [{"threads": results["settings"].get("threads"), "models": results["models"]}]
    for run_ in runs:
        lines += _tables(run_["models"], run_["threads"])
    return "\n".join(lines)


def _tables(models: dict[str, Any], threads: Any) -> list[str]:
    lines = []
    for mname, res in models.items():
        params = f"{res['params'] / 1e6:.2f} M parameters"
        lines.append(f"\n**{mname}** ({threads} thread(s)): {res['describe']} ({params})\n")
        lines.append(
            "| configuration | CPU time ms/step | ratio (CPU time) | vs floor (CPU) | wall ms/step | ratio (wall) "
            "| vs floor (wall) | ops/step (non-logging / logging) | peak memory (MiB) | host reads/step |"
        )
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for v, e in res["variants"].items():
            label = LABELS[v] + (f" ({e['note']})" if e.get("note") else "")
            cells = [label]
            for c in ("cpu", "wall"):
                rng = (f"**{e[f'{c}_ratio']:.3f}** [{e[f'{c}_ratio_q25']:.3f}, {e[f'{c}_ratio_q75']:.3f}]"
                       if v != "bare" else "1")
                cells += [f"{e[f'{c}_step_ms']:.2f}", rng, f"{e[f'{c}_vs_floor']:.3f}" if f"{c}_vs_floor" in e else "-"]
            cells.append(f"{e['ops_non_logging']} / {e['ops_logging']}" if "ops_logging" in e else "-")
            cells.append(f"{e['peak_mib']:.0f}" if e.get("peak_mib") is not None else "-")
            cells.append(f"{e['host_reads_per_step']:.1f}" if "host_reads_per_step" in e else "-")
            lines.append("| " + " | ".join(cells) + " |")
        sf = res.get("stats_vs_floor")
        if sf:
            lines.append(
                f"\nstatistics alone (non-logging step): {sf['stats_us']:.0f} us; one `_foreach_norm` pass over "
                f"the {sf['n_grads']} gradients ({sf['grad_mib']:.1f} MiB): {sf['floor_us']:.0f} us; ratio "
                f"{sf['stats_over_floor']:.2f}. Logging-step statistics (adds max|g| and parameter norms): "
                f"{sf['stats_full_us']:.0f} us. Whole monitor.step(): non-logging {sf['trip_warn_us']:.0f} us "
                f"(on_nonfinite=\"warn\"), {sf['trip_skip_us']:.0f} us (\"skip\"), of which the default detectors "
                f"{sf['detectors_us']:.0f} us; logging step with a JSONL sink {sf['trip_logging_us']:.0f} us."
            )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (sizes, repetitions, what to run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--reps", type=int, default=5, help="repetitions (bare/variant block pairs per variant)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each block")
    p.add_argument("--chunks", type=int, default=3, help="timed chunks per block")
    p.add_argument("--chunk", type=int, default=10, help="steps per timed chunk (10 = one logging step each)")
    p.add_argument("--threads", default="1,2",
                   help="comma-separated torch.set_num_threads values; the whole comparison runs once per value")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mlp-width", type=int, default=512)
    p.add_argument("--mlp-depth", type=int, default=24)
    p.add_argument("--batch", type=int, default=64, help="MLP batch size")
    p.add_argument("--tf-width", type=int, default=128)
    p.add_argument("--tf-layers", type=int, default=4)
    p.add_argument("--tf-seq", type=int, default=32)
    p.add_argument("--tf-batch", type=int, default=8)
    p.add_argument("--cnn-width", type=int, default=16)
    p.add_argument("--cnn-blocks", type=int, default=2)
    p.add_argument("--cnn-res", type=int, default=24)
    p.add_argument("--cnn-batch", type=int, default=16)
    p.add_argument("--stats-reps", type=int, default=30, help="samples of the statistics-vs-floor timing (0: skip)")
    p.add_argument("--stats-calls", type=int, default=20, help="calls per statistics-vs-floor sample")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="peak memory (CPU: one child process per model and variant)")
    p.add_argument("--host-reads", action=argparse.BooleanOptionalAction, default=True,
                   help="count host reads per step per variant")
    p.add_argument("--ops", action=argparse.BooleanOptionalAction, default=True,
                   help="count the ATen ops each variant adds to a non-logging and a logging iteration")
    p.add_argument("--malloc", choices=("steady", "default"), default="steady",
                   help="steady (default): glibc keeps freed memory (no trim, no mmap below 1 GiB), so no step "
                        "pays page faults for what the previous one freed; default: glibc as configured")
    p.add_argument("--child-timeout", type=float, default=600.0)
    p.add_argument("--tiny", action="store_true", help="tiny sizes and counts (smoke test)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.mlp_width, args.mlp_depth, args.batch = 16, 3, 4
        args.tf_width, args.tf_layers, args.tf_seq, args.tf_batch = 32, 1, 8, 2
        args.cnn_width, args.cnn_blocks, args.cnn_res, args.cnn_batch = 4, 1, 8, 2
        args.warmup, args.chunks, args.chunk = 2, 1, 3
        args.stats_reps, args.stats_calls = min(args.stats_reps, 2), 2
    for name in ("reps", "chunks", "chunk"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1; got {getattr(args, name)}")
    try:
        args.thread_list = [int(t) for t in str(args.threads).split(",") if t]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated integers >= 1; got {args.threads!r}") from None
    if not args.thread_list or min(args.thread_list) < 1:
        raise SystemExit(f"--threads must be comma-separated integers >= 1; got {args.threads!r}")
    args.threads = args.thread_list[0]
    return args


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_malloc() -> str:
    """Make glibc keep freed memory for reuse (CPU runs): what ``--malloc steady`` measures under.

    By default glibc hands freed memory back to the OS (heap trim, one ``mmap`` per large block) and
    adapts its thresholds to the sizes freed so far, so whether a step's gradients and activations land
    on pages already mapped or page-fault afresh (~22 MiB of faults, +7 ms per backward of the MLP,
    measured) depends on where the previous steps' small allocations happened to fall in the heap. In
    an interleaved comparison that charges one configuration for the heap layout another leaves (the
    bare step after a gradwatch step ran at 20.7 ms backward, the gradwatch step after a bare one at
    27.5 ms, with ~5,700 minor faults each). Fixed thresholds that never give memory back make every
    configuration run on a warm heap (as jemalloc/tcmalloc-linked processes do): no step page-faults
    after warm-up, and the ratios measure the work. Returns what was set (for the JSON).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return "unchanged (not glibc)"
    libc = ctypes.CDLL(name)
    ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    return "steady: glibc M_TRIM_THRESHOLD = M_MMAP_THRESHOLD = 1 GiB" if ok else "unchanged (mallopt refused)"


def main(argv: list[str] | None = None, *, configure_malloc: bool = False) -> int:
    """Entry point (``configure_malloc``: apply ``--malloc steady`` to this process; the command line does)."""
    args = parse_args(argv)
    steady = configure_malloc and args.malloc == "steady" and args.device == "cpu"
    args.malloc_set = steady_malloc() if steady else "glibc defaults"
    if args.memory_child:
        torch.set_num_threads(args.threads)
        memory_child(args)
        return 0
    results = run(args)
    m = results["machine"]
    print(f"\n{m['cpu']} ({m['cpu_count']} cores, torch threads {m['torch_threads']}), torch {m['torch']}, "
          f"Python {m['python']}, load average at start {m['load_average'][0]:.2f}, malloc {args.malloc_set}")
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)


if __name__ == "__main__":
    sys.exit(main(configure_malloc=True))
