"""GPU check: no host-device syncs on non-logging steps, and the overhead table on a CUDA card.

Two parts:

1. **Syncs**, with ``torch.cuda.set_sync_debug_mode``: for several configurations (plain, each
   clipper, ``track_activations=True``, ``granularity="parameter"``, a ``GradScaler``), every
   non-logging ``monitor.step()`` runs in mode ``"error"`` (any synchronizing CUDA call raises)
   when the configuration promises zero syncs (``on_nonfinite="warn"``, or a scaler, which owns
   overflow handling), and in mode ``"warn"`` with the warnings counted when it promises one
   (``on_nonfinite="skip"``: exactly one). The naive ``p.grad.norm().item()`` loop is counted the
   same way for contrast (one sync per parameter).
2. **Overhead**: ``benchmarks/overhead.py``'s comparison on the device, with a larger MLP by
   default, peak memory from ``torch.cuda.max_memory_allocated``; prints the table and writes JSON.

Without CUDA it says so and exits with status 0 (CI never needs a GPU)::

    python benchmarks/gpu_check.py                       # both parts, default sizes
    python benchmarks/gpu_check.py --syncs-only
    python benchmarks/gpu_check.py --reps 3 --json benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (benchmarks/overhead.py, next to this file)

import gradwatch as gw  # noqa: E402


def _mlp(width: int, depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(depth):
        mods += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 10)).to(device)


def _count_syncs(fn: Callable[[], Any]) -> int:
    """Run ``fn`` with sync debug mode "warn" and count the synchronizing calls it made."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def _no_syncs(fn: Callable[[], Any]) -> None:
    """Run ``fn`` with sync debug mode "error": any synchronizing CUDA call raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


CONFIGS: dict[str, tuple[dict[str, Any], int]] = {
    # name: (GradWatch keywords, syncs allowed per non-logging step)
    "warn": ({"on_nonfinite": "warn"}, 0),
    "warn+Norm": ({"on_nonfinite": "warn", "clip": lambda: gw.clip.Norm(1.0)}, 0),
    "warn+Value": ({"on_nonfinite": "warn", "clip": lambda: gw.clip.Value(0.1)}, 0),
    "warn+AGC": ({"on_nonfinite": "warn", "clip": lambda: gw.clip.AGC()}, 0),
    "warn+ZScore": ({"on_nonfinite": "warn", "clip": lambda: gw.clip.ZScore(warmup=3)}, 0),
    "warn+Percentile": ({"on_nonfinite": "warn", "clip": lambda: gw.clip.Percentile(history=64)}, 0),
    "warn+activations": ({"on_nonfinite": "warn", "track_activations": True}, 0),
    "warn+parameter": ({"on_nonfinite": "warn", "granularity": "parameter"}, 0),
    "skip (default)": ({}, 1),
    "skip+GradScaler": ({"scaler": "cuda"}, 0),
}


def check_syncs(device: torch.device, width: int, depth: int, steps: int, log_every: int) -> list[dict[str, Any]]:
    """Run every configuration; raise AssertionError on a sync that is not allowed."""
    rows = []
    x = torch.randn(64, width, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    for name, (kw, allowed) in CONFIGS.items():
        model = _mlp(width, depth, device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        kw = dict(kw)
        scaler = None
        if kw.get("scaler") == "cuda":
            scaler = torch.amp.GradScaler("cuda")
            kw["scaler"] = scaler
        if callable(kw.get("clip")):
            kw["clip"] = kw["clip"]()
        monitor = gw.GradWatch(model, sinks=[], on_alert="ignore", log_every=log_every, **kw)
        counts = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            logging = step % log_every == 0

            def fwd_bwd(model: nn.Module = model, scaler: Any = scaler) -> None:
                loss = nn.functional.cross_entropy(model(x), y)
                (scaler.scale(loss) if scaler is not None else loss).backward()

            if kw.get("track_activations") and not logging and step > 0:
                _no_syncs(fwd_bwd)  # the activation hooks run in the forward
            else:
                fwd_bwd()
            if scaler is not None:
                scaler.unscale_(opt)
            if logging:
                monitor.step()
            elif allowed == 0:
                _no_syncs(monitor.step)
                counts.append(0)
            else:
                n = _count_syncs(monitor.step)
                if n != allowed:
                    raise AssertionError(f"{name}: step {step} made {n} host syncs; expected exactly {allowed}")
                counts.append(n)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        monitor.close()
        rows.append({"config": name, "non_logging_steps": len(counts), "syncs_per_step": allowed})
    # contrast: the naive per-parameter loop
    model = _mlp(width, depth, device)
    nn.functional.cross_entropy(model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    n = _count_syncs(lambda: [p.grad.norm().item() for p in params])
    rows.append({"config": "naive p.grad.norm().item() loop", "non_logging_steps": 1, "syncs_per_step": n})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--syncs-only", action="store_true", help="only the sync check")
    p.add_argument("--sync-width", type=int, default=1024)
    p.add_argument("--sync-depth", type=int, default=8)
    p.add_argument("--sync-steps", type=int, default=25)
    p.add_argument("--json", default=None, help="write the overhead results here")
    args, rest = p.parse_known_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. "
              "The CPU figures come from: python benchmarks/overhead.py")
        return 0
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    rows = check_syncs(device, args.sync_width, args.sync_depth, args.sync_steps, log_every=10)
    print("\nHost-device syncs per non-logging monitor.step() (asserted with torch.cuda.set_sync_debug_mode):\n")
    print("| configuration | syncs per non-logging step | steps checked |")
    print("| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['syncs_per_step']} | {r['non_logging_steps']} |")
    if args.syncs_only:
        return 0
    # The overhead comparison on the device: a larger MLP by default (overridable on the command line).
    defaults = ["--device", "cuda", "--mlp-width", "2048", "--mlp-depth", "24", "--batch", "256",
                "--tf-width", "512", "--tf-layers", "8", "--tf-seq", "256", "--tf-batch", "32",
                "--cnn-width", "64", "--cnn-blocks", "3", "--cnn-res", "64", "--cnn-batch", "128",
                "--threads", str(torch.get_num_threads())]
    oargs = overhead.parse_args(defaults + rest)
    results = overhead.run(oargs)
    results["syncs"] = rows
    print(overhead.table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
