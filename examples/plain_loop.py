"""gradwatch in a plain PyTorch loop: a deep sigmoid MLP whose gradients vanish, then the fix.

Run:  python examples/plain_loop.py            (CPU, ~10 s)

1. A 12-layer sigmoid MLP (PyTorch default init): gradwatch reports vanishing gradients in the
   first layers and names the remedies for *this* model (ReLU + He init, BatchNorm, ...).
2. A NaN injected at step 30 is skipped: the weights stay as they were, and training goes on.
3. The same MLP with ReLU and He (Kaiming) init, watched with zero changes to the loop
   (``gw.watch``): no alert.

Records go to runs/plain_loop/*.jsonl (and TensorBoard event files when tensorboard is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

import gradwatch as gw


def mlp(depth: int, width: int, act: type[nn.Module], he_init: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 16
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if he_init:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def data(steps: int, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 1, generator=g)
    xs = [torch.randn(batch, 16, generator=g) for _ in range(steps)]
    return [(x, torch.tanh(x @ teacher)) for x in xs]


def explicit_loop(out: Path, steps: int) -> None:
    print("== 1-2. deep sigmoid MLP, explicit monitor.step(), NaN injected at step 30 ==")
    torch.manual_seed(0)
    model = mlp(12, 64, nn.Sigmoid)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sinks: list[gw.sinks.Sink] = [gw.sinks.Console(every=20), gw.sinks.JSONL(out / "sigmoid.jsonl")]
    if importlib.util.find_spec("tensorboard") is not None:
        sinks.append(gw.sinks.TensorBoard(out / "tb_sigmoid"))
    monitor = gw.GradWatch(model, sinks=sinks, log_every=10, clip=gw.clip.Norm(5.0), on_alert="ignore")
    for step, (x, y) in enumerate(data(steps)):
        loss = nn.functional.mse_loss(model(x), y)
        if step == 30:
            loss = loss * float("nan")  # a poisoned batch
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()] if step == 30 else None
        report = monitor.step()  # after backward, before optimizer.step()
        opt.step()
        opt.zero_grad()
        if before is not None:
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            print(f"step 30 skipped={report.skipped}; weights unchanged: {unchanged}")
    monitor.close()
    kinds = sorted({a.kind for a in monitor.alerts})
    print(f"alerts: {len(monitor.alerts)} ({', '.join(kinds)}); skipped steps: {monitor.skipped_steps}")


def watched_loop(out: Path, steps: int) -> None:
    print("\n== 3. the remedy: ReLU + He init, gw.watch (no change to the loop) ==")
    torch.manual_seed(0)
    model = mlp(12, 64, nn.ReLU, he_init=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gw.watch(model, opt, sinks=[gw.sinks.Console(every=20), gw.sinks.JSONL(out / "relu_he.jsonl")],
                  log_every=10) as monitor:
        for x, y in data(steps):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()  # gradwatch runs in the optimizer's step pre-hook
            opt.zero_grad()
    last = monitor.history[-1]
    first, deepest = monitor.layers[0], monitor.layers[-1]
    ratio = last[f"grad_norm/{first}"] / last[f"grad_norm/{deepest}"]
    print(f"alerts: {len(monitor.alerts)}; first/last layer grad-norm ratio at step {int(last['step'])}: {ratio:.2g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/plain_loop"))
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)  # models this small run fastest on one thread
    explicit_loop(args.out, args.steps)
    watched_loop(args.out, args.steps)
    print(f"\nrecords: {args.out}/*.jsonl")


if __name__ == "__main__":
    main()
