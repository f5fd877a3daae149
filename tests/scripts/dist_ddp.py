"""2-process DDP on CPU (gloo) with gradwatch attached; run by tests/test_distributed.py.

Usage: python dist_ddp.py OUT_DIR

Three runs, each on the deterministic batches of ``dist_common``:

* ``records``: both ranks build the same ``JSONL(OUT_DIR/ddp.jsonl)`` sink; only rank 0 may
  write. Counts the all-reduces each ``step()`` makes (the non-finite flag: one).
* ``warn``: ``on_nonfinite="warn"``: no collective at all.
* ``nan``: a NaN is written into rank 1's gradient at step 3 after DDP's all-reduce; both ranks
  must skip that step and keep equal, finite weights.
* ``fsdp1_warnings``: parameters flattened by FSDP1 get a warning (rank 0) that norms are local.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C  # noqa: E402

import gradwatch as gw  # noqa: E402

STEPS = 6
NAN_STEP = 3


def _weights_equal_across_ranks(model: torch.nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _train(rank: int, monitor_kw: dict[str, Any], nan_step: int | None = None) -> dict[str, Any]:
    model = C.make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gw.GradWatch(ddp, **monitor_kw)
    collectives, skipped, equal, finite, steps = [], [], [], [], []
    for step in range(STEPS):
        x, y = C.batch(step)
        C.loss_fn(ddp(C.shard(x, rank)), C.shard(y, rank)).backward()
        if step == nan_step and rank == 1:
            with torch.no_grad():
                model[2].weight.grad[0, 0] = float("nan")
        with C.CountAllReduce() as count:
            report = monitor.step()
        collectives.append(count.calls)
        skipped.append(report.skipped)
        steps.append(report.step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        equal.append(_weights_equal_across_ranks(model))
        finite.append(all(math.isfinite(v) for v in C.flat_params(model)))
    monitor.close()
    return {
        "layers": monitor.layers,
        "collectives": collectives,
        "skipped": skipped,
        "steps": steps,
        "weights_equal": equal,
        "weights_finite": finite,
        "skipped_steps": monitor.skipped_steps,
        "weights": C.flat_params(model),
    }


def _fsdp1_warnings() -> list[str]:
    # FSDP1 cannot run on CPU ("FSDP needs a non-CPU accelerator device"); mark the parameters
    # the way FullyShardedDataParallel's FlatParameter does, with torch's own helper.
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    model = C.make_model()
    for p in model.parameters():
        _set_fsdp_flattened(p)
    monitor = gw.GradWatch(model, sinks=[])
    x, y = C.batch(0)
    C.loss_fn(model(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.step()
    monitor.close()
    return [str(w.message) for w in caught if issubclass(w.category, gw.GradWatchWarning)]


def worker(rank: int, out_dir: str) -> dict[str, Any]:
    jsonl = os.path.join(out_dir, "ddp.jsonl")
    return {
        "rank": rank,
        "records": _train(
            rank, {"sinks": [gw.sinks.JSONL(jsonl)], "log_every": 2, "grad_max_every": 1, "param_norm_every": 1}
        ),
        "warn": _train(rank, {"sinks": [], "log_every": 2, "on_nonfinite": "warn"}),
        "nan": _train(
            rank,
            {"sinks": [gw.sinks.JSONL(os.path.join(out_dir, "nan.jsonl"))], "log_every": 100, "on_alert": "ignore"},
            nan_step=NAN_STEP,
        ),
        "fsdp1_warnings": _fsdp1_warnings(),
    }


if __name__ == "__main__":
    C.run(worker, sys.argv[1])
