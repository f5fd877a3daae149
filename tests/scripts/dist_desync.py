"""2-process gloo jobs for the ``desync`` check (DDP and FSDP2); run by tests/test_desync.py.

Usage: python dist_desync.py OUT_DIR

Runs, all on the deterministic batches of ``dist_common`` (SGD, lr 0.1), each rank recording its
monitor's alerts, the collectives each ``monitor.step()`` made (counted by wrapping
``torch.distributed.all_gather`` / ``all_reduce``: the calls go through) and what the desync
check measured:

* ``module_bug``: DDP; from step ``BUG_STEP`` on the loop calls ``ddp.module(x)`` instead of
  ``ddp(x)``, so the gradient all-reduce never runs again (log_every ``LOG_EVERY``).
* ``skip_step``: DDP; rank 1 alone skips ``optimizer.step()`` at ``SKIP_STEP`` (both monitors step).
* ``healthy``: DDP, ``HEALTHY_STEPS`` steps, a check at every step.
* ``hsdp``: FSDP2 ``fully_shard`` on a 2 x 1 (replicate, shard) mesh: every parameter is a DTensor
  replicated over the 2 ranks; ``HEALTHY_STEPS`` steps, a check at every step.
* ``fsdp_full``: FSDP2 sharded over both ranks: no replica to compare, the check is off.
* ``fsdp_partial``: FSDP2 on layers ``0`` and ``2`` only; the head ``4`` stays a plain module whose
  gradients nobody reduces.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C  # noqa: E402

import gradwatch as gw  # noqa: E402

LOG_EVERY = 4
BUG_STEPS, BUG_STEP = 12, 5
SKIP_STEPS, SKIP_STEP = 12, 6
HEALTHY_STEPS = 120
PARTIAL_STEPS = 3


class CountCollectives:
    """Counts ``torch.distributed.all_gather`` and ``all_reduce`` calls inside the ``with`` block."""

    NAMES = ("all_gather", "all_reduce")

    def __enter__(self) -> CountCollectives:
        self.calls = dict.fromkeys(self.NAMES, 0)
        self._orig = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self._orig.items():
            setattr(dist, name, self._counting(name, fn))
        return self

    def _counting(self, name: str, fn: Any) -> Any:
        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counting

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._orig.items():
            setattr(dist, name, fn)


def _loop(
    rank: int, model: torch.nn.Module, forward: Any, steps: int, log_every: int, skip: tuple[int, int] | None = None,
) -> dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gw.GradWatch(model, sinks=[], log_every=log_every, on_alert="ignore")
    gathers, reduces, largest = [], [], []
    for step in range(steps):
        x, y = C.batch(step)
        C.loss_fn(forward(step)(C.shard(x, rank)), C.shard(y, rank)).backward()
        with CountCollectives() as count:
            monitor.step()
        gathers.append(count.calls["all_gather"])
        reduces.append(count.calls["all_reduce"])
        check = monitor._desync
        last = check.last if check is not None else None
        largest.append([max(last.param_rel), max(last.grad_rel)] if last is not None and gathers[-1] else None)
        if skip is None or (rank, step) != skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
    monitor.close()
    check = monitor._desync
    return {
        "alerts": [a.to_dict() for a in monitor.alerts if a.kind == "desync"],
        "kinds": sorted({a.kind for a in monitor.alerts}),
        "all_gather": gathers,
        "all_reduce": reduces,
        "largest": largest,
        "active": check is not None,
        "tracked": len(check.tracked) if check is not None else 0,
        "checks": check.checks if check is not None else 0,
        "projection_floats": check.projection_floats if check is not None else 0,
    }


def _ddp(rank: int, steps: int, log_every: int, bug_from: int | None = None, skip: tuple[int, int] | None = None):
    model = C.make_model()
    ddp = DDP(model)
    return _loop(rank, ddp, lambda s: ddp.module if bug_from is not None and s >= bug_from else ddp, steps,
                 log_every, skip)


def _fsdp(rank: int, mode: str, steps: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = C.make_model()
    if mode == "hsdp":
        mesh = init_device_mesh("cpu", (C.WORLD, 1), mesh_dim_names=("replicate", "shard"))
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif mode == "full":
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m)
        fully_shard(model)
    else:  # partial: the head and the root are left out of fully_shard
        fully_shard(model[0])
        fully_shard(model[2])
    return _loop(rank, model, lambda s: model, steps, 1)


def worker(rank: int, out_dir: str) -> dict[str, Any]:
    return {
        "rank": rank,
        "module_bug": _ddp(rank, BUG_STEPS, LOG_EVERY, bug_from=BUG_STEP),
        "skip_step": _ddp(rank, SKIP_STEPS, LOG_EVERY, skip=(1, SKIP_STEP)),
        "healthy": _ddp(rank, HEALTHY_STEPS, 1),
        "hsdp": _fsdp(rank, "hsdp", HEALTHY_STEPS),
        "fsdp_full": _fsdp(rank, "full", PARTIAL_STEPS),
        "fsdp_partial": _fsdp(rank, "partial", PARTIAL_STEPS),
    }


if __name__ == "__main__":
    C.run(worker, sys.argv[1])
