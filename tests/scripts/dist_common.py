"""Shared pieces of the 2-process gloo scripts (``dist_*.py``) and of the tests that check them.

Models and batches are deterministic, so a test can rebuild the exact single-process reference
of what the ranks computed together.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WORLD = 2
GLOBAL_BATCH = 8
IN_FEATURES = 16


LAYERS = ["0", "2", "4"]


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(seed: int = 0) -> nn.Sequential:
    """An MLP with uneven shards on 2 ranks: 7 rows split 4/3, and a Linear(64, 1) head whose weight
    and bias are empty on rank 1 under FSDP2's ``Shard(0)``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 7),
        nn.Tanh(),
        nn.Linear(7, 64),
        nn.Tanh(),
        nn.Linear(64, 1),
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same on every rank and in the reference)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=g)
    y = torch.randn(GLOBAL_BATCH, 1, generator=g)
    return x, y


def shard(t: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    """This rank's rows of a global batch."""
    per = t.shape[0] // world
    return t[rank * per : (rank + 1) * per]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


class CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls made inside the ``with`` block."""

    def __enter__(self) -> CountAllReduce:
        import torch.distributed as dist

        self.calls = 0
        self._orig = dist.all_reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        dist.all_reduce = self._orig


def run(worker: Callable[[int, str], dict[str, Any]], out_dir: str) -> None:
    """Spawn ``WORLD`` gloo ranks running ``worker(rank, out_dir)``; each rank's result goes to
    ``out_dir/rank{r}.json``."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_entry, args=(worker, out_dir, port), nprocs=WORLD, join=True)


def _entry(rank: int, worker: Callable[[int, str], dict[str, Any]], out_dir: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = worker(rank, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def flat_params(model: nn.Module) -> list[float]:
    """Every parameter value as one list (full tensors for DTensors)."""
    out: list[float] = []
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out += t.detach().reshape(-1).tolist()
    return out


def reference(
    steps: int,
    *,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    skip: tuple[int, ...] = (),
    prefix: str = "",
    agc: tuple[float, tuple[str, ...]] | None = None,
) -> list[dict[str, Any]]:
    """Train the unsharded model on the global batches in float64: per step, the per-layer
    statistics of the gradients (pre-clip) and the weights after the optimizer step.

    ``agc=(clipping, excluded layers)``: unit-wise AGC of the 2-D weights (1-D left out), written
    out from the formula of Brock et al. 2021 with eps=1e-3."""
    model = make_model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(steps):
        x, y = batch(step)
        loss_fn(model(x.double()), y.double()).backward()
        m: dict[str, float] = {}
        total_sq = 0.0
        for name in LAYERS:
            mod = model.get_submodule(name)
            key = prefix + name
            grads = [p.grad.reshape(-1) for p in mod.parameters()]
            g = torch.cat(grads)
            w = torch.cat([p.detach().reshape(-1) for p in mod.parameters()])
            m[f"grad_norm/{key}"] = g.norm().item()
            m[f"grad_max/{key}"] = g.abs().max().item()
            m[f"param_norm/{key}"] = w.norm().item()
            total_sq += g.pow(2).sum().item()
        m["grad_norm/total"] = math.sqrt(total_sq)
        if step in skip:
            opt.zero_grad(set_to_none=True)
        elif agc is not None:
            clipping, excluded = agc
            with torch.no_grad():
                for name in LAYERS:
                    if name in excluded:
                        continue
                    w = model.get_submodule(name).weight
                    bound = clipping * w.norm(dim=1).clamp_min(1e-3)
                    g_norm = w.grad.norm(dim=1)
                    w.grad.mul_(torch.where(g_norm > bound, bound / g_norm, torch.ones_like(g_norm))[:, None])
        elif max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type)
            m["grad_norm_clipped/total"] = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({"metrics": m, "weights": [v for p in model.parameters() for v in p.detach().reshape(-1).tolist()]})
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit("dist_common.py is a helper module; run dist_ddp.py or dist_fsdp.py")
