"""One-command GPU proof: kernel launches, host-device syncs and step-time ratios of gradwatch and its peers.

On a CUDA machine ``python benchmarks/gpu_check.py`` (a few minutes; DDP-free) measures, for an MLP, a
pre-LN transformer and a ResNet-50-sized CNN trained in bf16 autocast with AdamW:

1. **Kernel launches per step** (``torch.profiler``, CUDA kernels and memcpys): one iteration
   (forward, backward, the contender's work, ``optimizer.step``) minus the bare iteration, on a
   non-logging and on a logging step of gradwatch's cadence (``log_every=10``).
2. **Host-device syncs per step** (``torch.cuda.set_sync_debug_mode``), over the whole iteration minus
   the bare one. Asserted: zero on non-logging steps with ``on_nonfinite="warn"`` (mode ``"error"``:
   any synchronizing call raises) and with ``"skip"`` under a fused optimizer (``fused=True``: the
   skip is taken on the device, issue 16), exactly one with ``"skip"`` under a non-fused optimizer.
3. **Step time over the bare loop**, timed with CUDA events, bare and contender chunks alternating on
   one model (median ratio and quartiles over the chunks).

Contenders: the floor (one ``torch._foreach_norm`` pass and a finiteness check per step),
gradwatch (default with AdamW and with AdamW ``fused=True``, ``on_nonfinite="warn"``,
``log_every=1``), Lightning's ``grad_norm``, the naive ``p.grad.norm().item()`` loop and, with
``--wandb``, ``wandb.watch``.

``--device cpu`` runs every part end to end on the CPU, so nothing here is untested without a GPU:
ATen ops stand for kernel launches (each would be one), Python-level host reads (``.item()``,
``.tolist()``, ``bool(t)``...) for syncs, ``time.perf_counter`` for CUDA events, and the models
shrink (``--small``, implied). It writes one JSON and prints a table::

    python benchmarks/gpu_check.py --json benchmarks/results/gpu.json          # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --json /tmp/gpu_check_cpu.json  # the CPU dry run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/overhead.py, next to this file: host-read counter, encoder)

import gradwatch as gw  # noqa: E402

LOG_EVERY = 10
CONTENDERS = ("floor", "default", "default_fused", "warn", "every1", "lightning", "naive", "wandb")
LABELS = {
    "floor": "floor: one _foreach_norm pass + finiteness check",
    "default": "gradwatch default (skip), AdamW",
    "default_fused": "gradwatch default (skip), AdamW fused=True",
    "warn": 'gradwatch on_nonfinite="warn"',
    "every1": "gradwatch log_every=1",
    "lightning": "Lightning grad_norm(model, 2)",
    "naive": "naive p.grad.norm().item() loop",
    "wandb": 'wandb.watch(log="gradients", log_freq=1)',
}
# Syncs a contender may make on a non-logging step (None: not asserted, only reported).
PROMISED_SYNCS: dict[str, int | None] = {
    "floor": 0, "default": 1, "default_fused": 0, "warn": 0, "every1": None, "lightning": None, "naive": None,
    "wandb": None,
}


# ------------------------------------------------------------------------------------------ models
class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.short(x))


class ResNet50(nn.Module):
    """ResNet-50's layout (bottleneck stages of 3, 4, 6, 3 blocks): 25.6 M parameters at ``base=64``."""

    def __init__(self, base: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks: list[nn.Module] = []
        c = base
        for i, n in enumerate((3, 4, 6, 3)):
            width = base * 2**i
            for j in range(n):
                blocks.append(_Bottleneck(c, width, 2 if (j == 0 and i > 0) else 1))
                c = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@dataclass
class Workload:
    """A model with a fixed batch, trained under bf16 autocast."""

    name: str
    describe: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    initial: dict[str, Tensor]

    def loss(self) -> Tensor:
        with torch.autocast(self.inputs.device.type, dtype=torch.bfloat16):
            out = self.model(self.inputs)
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), self.targets.reshape(-1))

    def reset(self, fused: bool) -> torch.optim.Optimizer:
        """The initial weights again and a fresh AdamW (``fused=True`` or the default foreach one)."""
        self.model.load_state_dict(self.initial)
        for p in self.model.parameters():
            p.grad = None
        return torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused or None)


def build(name: str, small: bool, device: torch.device) -> Workload:
    """The MLP, the transformer or the ResNet-50-sized CNN (``small``: CPU-sized, same layouts)."""
    torch.manual_seed(0)
    if name == "mlp":
        w, d, b = (32, 8, 8) if small else (2048, 24, 256)
        mods: list[nn.Module] = []
        for _ in range(d):
            mods += [nn.Linear(w, w), nn.LayerNorm(w), nn.GELU()]
        model: nn.Module = nn.Sequential(*mods, nn.Linear(w, 10))
        x, y = torch.randn(b, w), torch.randint(0, 10, (b,))
        describe = f"{d}-layer MLP width {w}, LayerNorm+GELU, batch {b}"
    elif name == "transformer":
        d, n, s, b = (32, 2, 8, 2) if small else (768, 12, 512, 16)
        vocab = 100 if small else 32000
        model = overhead._Encoder(vocab, d, n, max(1, d // 64), s)
        x, y = torch.randint(0, vocab, (b, s)), torch.randint(0, vocab, (b, s))
        describe = f"pre-LN transformer, {n} layers d={d}, seq {s}, batch {b}, vocab {vocab}"
    elif name == "cnn":
        base, r, b = (4, 64, 4) if small else (64, 224, 64)
        model = ResNet50(base, 10 if small else 1000)
        x, y = torch.randn(b, 3, r, r), torch.randint(0, 10 if small else 1000, (b,))
        describe = f"ResNet-50 layout (3-4-6-3 bottlenecks), base width {base}, {r}x{r} input, batch {b}"
    else:
        raise ValueError(f"`--models` entries must be one of mlp, transformer, cnn; got {name!r}")
    model.to(device)
    n = sum(p.numel() for p in model.parameters())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    return Workload(name, f"{describe}, bf16 autocast, AdamW ({n / 1e6:.1f} M parameters)", model,
                    x.to(device), y.to(device), initial)


# -------------------------------------------------------------------------------------- contenders
class Contender:
    """What a contender does between ``backward()`` and ``optimizer.step()``, with its optimizer."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.fused = name == "default_fused"
        self.tmp = tmp
        self.monitor: gw.GradWatch | None = None
        self._after: Callable[[Tensor, torch.optim.Optimizer], Any] | None = None
        self._model: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        self._model = model
        params = [p for p in model.parameters() if p.requires_grad]
        n = self.name
        if n in ("default", "default_fused", "warn", "every1"):
            kw: dict[str, Any] = {"sinks": [gw.sinks.JSONL(self.tmp / f"{n}-{id(self)}.jsonl")], "on_alert": "ignore"}
            if n == "warn":
                kw["on_nonfinite"] = "warn"
            if n == "every1":
                kw["log_every"] = 1
            monitor = gw.GradWatch(model, **kw)
            self.monitor = monitor
            self._after = lambda loss, opt: monitor.step(loss=loss, optimizer=opt)
        elif n == "floor":
            # One _foreach_norm read of every gradient and a finiteness check, left on the device (no sync).
            self._after = lambda loss, opt: torch.isfinite(
                torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])).sum()
            )
        elif n == "naive":
            self._after = lambda loss, opt: [p.grad.norm().item() for p in params if p.grad is not None]
        elif n == "lightning":
            from lightning.pytorch.utilities.grads import grad_norm

            self._after = lambda loss, opt: grad_norm(model, 2)
        elif n == "wandb":
            overhead._wandb_run(self.tmp).watch(model, log="gradients", log_freq=1)
        elif n != "bare":
            raise ValueError(f"contender must be one of {', '.join(CONTENDERS)}; got {n!r}")

    def after_backward(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        if self._after is not None:
            self._after(loss, opt)

    def teardown(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.name == "wandb" and self._model is not None:
            overhead._wandb_run(self.tmp).unwatch(self._model)
        self._after = None


def iteration(wl: Workload, opt: torch.optim.Optimizer, who: Contender) -> None:
    """One optimizer step with the contender's work after backward."""
    opt.zero_grad(set_to_none=True)
    loss = wl.loss()
    loss.backward()
    who.after_backward(loss.detach(), opt)
    opt.step()


# ------------------------------------------------------------------------------------ measurements
class _AtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def launches(fn: Callable[[], None], device: torch.device) -> int:
    """CUDA kernels and memcpys that ``fn`` launches (``torch.profiler``); ATen ops on the CPU."""
    if device.type != "cuda":
        with _AtenOps() as c:
            fn()
        return c.n
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def syncs(fn: Callable[[], None], device: torch.device, *, forbid: bool = False) -> int:
    """Host-device syncs ``fn`` makes: ``set_sync_debug_mode`` warnings on CUDA (``forbid``: mode
    ``"error"``, so a sync raises), Python-level host reads on the CPU."""
    if device.type != "cuda":
        with overhead.count_host_reads() as c:
            fn()
        return c[0]
    if forbid:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def per_step_counts(wl: Workload, name: str, tmp: Path, device: torch.device) -> dict[str, Any]:
    """Launches and syncs of the contender's iteration minus the bare one, non-logging and logging.

    Steps 13 and 14 are non-logging steps of gradwatch's cadence (launches, then syncs; with a
    promise of zero, step 15 runs in sync-debug mode "error"), step 20 a logging one.
    """
    fused = Contender(name, tmp).fused  # the bare loop runs the same optimizer
    got: dict[str, dict[str, int]] = {}
    for who_name in ("bare", name):
        who = Contender(who_name, tmp)
        opt = wl.reset(fused)
        who.setup(wl.model)
        n: dict[str, int] = {}

        def one(opt: torch.optim.Optimizer = opt, who: Contender = who) -> None:
            iteration(wl, opt, who)

        try:
            for _ in range(LOG_EVERY + 3):
                one()
            n["launches_non_logging"] = launches(one, device)
            n["syncs_non_logging"] = syncs(one, device)
            if PROMISED_SYNCS.get(who_name) == 0 and device.type == "cuda":
                syncs(one, device, forbid=True)  # raises on any sync
            else:
                one()
            for _ in range(LOG_EVERY + 5, 2 * LOG_EVERY):
                one()
            n["launches_logging"] = launches(one, device)
        finally:
            who.teardown()
        got[who_name] = n
    out = {k: got[name][k] - got["bare"][k] for k in got[name]}
    promised = PROMISED_SYNCS.get(name)
    if promised is not None and out["syncs_non_logging"] != promised:
        raise AssertionError(
            f"{name} on {wl.name}: {out['syncs_non_logging']} host syncs on a non-logging step; promised {promised}"
        )
    return out


class _Clock:
    """Seconds between two marks: CUDA events on CUDA, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def measure(self, out: list[float]) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            yield
            out.append(time.perf_counter() - t0)


def step_ratio(wl: Workload, name: str, tmp: Path, device: torch.device, chunks: int, chunk: int) -> dict[str, float]:
    """Bare and contender chunks alternating on one model and optimizer; ratio of each pair."""
    who, bare = Contender(name, tmp), Contender("bare", tmp)
    opt = wl.reset(who.fused)
    clock = _Clock(device)
    times: dict[str, list[float]] = {"bare": [], "who": []}
    hooked = name == "wandb"  # gradient hooks: a bare block first, then its own
    if hooked:
        for _ in range(chunk):
            iteration(wl, opt, bare)
        for _ in range(chunks):
            with clock.measure(times["bare"]):
                for _ in range(chunk):
                    iteration(wl, opt, bare)
    who.setup(wl.model)
    try:
        for _ in range(chunk):  # warm-up: one whole logging cycle
            iteration(wl, opt, who)
        for i in range(chunks):
            order = ("who",) if hooked else (("bare", "who") if i % 2 == 0 else ("who", "bare"))
            for k in order:
                runner = who if k == "who" else bare
                with clock.measure(times[k]):
                    for _ in range(chunk):
                        iteration(wl, opt, runner)
    finally:
        who.teardown()
    ratios = [w / b for w, b in zip(times["who"], times["bare"])]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "step_ms": statistics.median(times["who"]) / chunk * 1e3,
        "bare_step_ms": statistics.median(times["bare"]) / chunk * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_q25": q[0],
        "ratio_q75": q[2],
    }


# ------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for every model and contender; JSON-ready."""
    device = torch.device(args.device)
    contenders = [c for c in args.contenders.split(",") if c]
    for c in contenders:
        if c not in CONTENDERS:
            raise ValueError(f"`--contenders` entries must be one of {', '.join(CONTENDERS)}; got {c!r}")
    results: dict[str, Any] = {
        "machine": overhead.machine(device),
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "units": {"launches": "CUDA kernels+memcpys" if device.type == "cuda" else "ATen ops",
                  "syncs": "sync-debug-mode events" if device.type == "cuda" else "Python-level host reads"},
        "log_every": LOG_EVERY,
        "models": {},
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for mname in [m for m in args.models.split(",") if m]:
            wl = build(mname, args.small, device)
            res: dict[str, Any] = {"describe": wl.describe, "contenders": {}}
            for c in contenders:
                entry = per_step_counts(wl, c, tmp, device)
                entry.update(step_ratio(wl, c, tmp, device, args.chunks, args.chunk))
                res["contenders"][c] = entry
                print(f"  [{mname}] {c}: ratio {entry['ratio']:.3f}, launches {entry['launches_non_logging']} / "
                      f"{entry['launches_logging']}, syncs {entry['syncs_non_logging']}", file=sys.stderr, flush=True)
            results["models"][mname] = res
            overhead._finish_wandb()
    results["seconds"] = time.perf_counter() - t_start
    return results


def table(results: dict[str, Any]) -> str:
    """Markdown tables, one per model."""
    u = results["units"]
    lines = [f"launches: {u['launches']}; syncs: {u['syncs']}; gradwatch logs every {results['log_every']} steps"]
    for mname, res in results["models"].items():
        lines.append(f"\n**{mname}**: {res['describe']}\n")
        lines.append("| contender | step ms | ratio to bare [quartiles] | launches/step (non-logging / logging) "
                     "| syncs per non-logging step |")
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        for c, e in res["contenders"].items():
            ratio = f"**{e['ratio']:.3f}** [{e['ratio_q25']:.3f}, {e['ratio_q75']:.3f}]"
            launched = f"{e['launches_non_logging']} / {e['launches_logging']}"
            lines.append(f"| {LABELS[c]} | {e['step_ms']:.2f} | {ratio} | {launched} | {e['syncs_non_logging']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the proof) or cpu (the end-to-end dry run)")
    p.add_argument("--models", default="mlp,transformer,cnn")
    p.add_argument("--contenders", default=",".join(c for c in CONTENDERS if c != "wandb"),
                   help=f"comma-separated subset of {','.join(CONTENDERS)}")
    p.add_argument("--wandb", action="store_true", help="also time wandb.watch (an offline run)")
    p.add_argument("--small", action="store_true", help="CPU-sized models (implied by --device cpu)")
    p.add_argument("--chunks", type=int, default=6, help="timed chunks per contender (bare chunks as many)")
    p.add_argument("--chunk", type=int, default=LOG_EVERY, help="steps per chunk (10: one logging step each)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.wandb and "wandb" not in args.contenders.split(","):
        args.contenders += ",wandb"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, or end to end on the CPU with --device cpu")
    if not args.device.startswith("cuda"):
        args.small = True
    if args.chunks < 2 or args.chunk < 1:
        raise SystemExit(f"--chunks must be >= 2 and --chunk >= 1; got {args.chunks}, {args.chunk}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    results = run(args)
    m = results["machine"]
    print(f"\n{m.get('gpu', m['cpu'])}, torch {m['torch']}, gradwatch {m['gradwatch']}, "
          f"{results['seconds']:.0f} s")
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
