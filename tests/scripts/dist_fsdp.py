"""2-process FSDP2 (``fully_shard``) on CPU (gloo) with gradwatch attached; run by tests/test_distributed.py.

Usage: python dist_fsdp.py OUT_DIR

The model of ``dist_common.make_model`` has uneven shards (7 rows split 4/3) and a Linear(64, 1)
head that is empty on rank 1. Three runs on the deterministic batches:

* ``stats``: JSONL records (rank 0 writes), the all-reduces of each ``step()`` counted.
* ``clip``: ``gw.clip.Norm`` with a threshold below the norms, SGD; full weights after each step.
* ``clip_inf``: ``gw.clip.Norm(norm_type=inf)``: the global max |g| over shards, empty ones included.
* ``nan``: a NaN in rank 0's local shard of layer ``2`` at step 1: both ranks skip.
* ``agc``: ``gw.clip.AGC`` on the row-sharded weights, the head (``4``, empty on rank 1) excluded by name.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C  # noqa: E402

import gradwatch as gw  # noqa: E402

STEPS = 4
MAX_NORM = 0.05
MAX_INF = 0.02  # below max |g| of every step: the inf-norm clipping is active
NAN_STEP = 1
AGC_CLIPPING = 0.01  # below every unit's gradient-to-weight ratio here: AGC is active


def sharded_model() -> torch.nn.Module:
    model = C.make_model()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def _train(rank: int, monitor_kw: dict[str, Any], nan_step: int | None = None) -> dict[str, Any]:
    model = sharded_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gw.GradWatch(model, **monitor_kw)
    collectives, skipped, weights, local_shapes = [], [], [], []
    for step in range(STEPS):
        x, y = C.batch(step)
        C.loss_fn(model(C.shard(x, rank)), C.shard(y, rank)).backward()
        if step == 0:
            local_shapes = [list(p.grad.to_local().shape) for p in model.parameters()]
        if step == nan_step and rank == 0:
            with torch.no_grad():
                model[2].weight.grad.to_local()[0, 0] = float("nan")
        with C.CountAllReduce() as count:
            report = monitor.step()
        collectives.append(count.calls)
        skipped.append(report.skipped)
        opt.step()
        opt.zero_grad(set_to_none=True)
        weights.append(C.flat_params(model))
    monitor.close()
    return {
        "layers": monitor.layers,
        "collectives": collectives,
        "skipped": skipped,
        "weights": weights,
        "finite": all(math.isfinite(v) for w in weights for v in w),
        "local_shapes": local_shapes,
    }


def worker(rank: int, out_dir: str) -> dict[str, Any]:
    return {
        "rank": rank,
        "stats": _train(rank, {"sinks": [gw.sinks.JSONL(os.path.join(out_dir, "fsdp.jsonl"))], "log_every": 2,
                                "grad_max_every": 1, "param_norm_every": 1}),
        "clip": _train(
            rank,
            {"sinks": [gw.sinks.JSONL(os.path.join(out_dir, "clip.jsonl"))], "log_every": 1, "grad_max_every": 1,
             "param_norm_every": 1, "clip": gw.clip.Norm(MAX_NORM)},
        ),
        "clip_inf": _train(
            rank,
            {"sinks": [], "log_every": 2, "grad_max_every": 1, "param_norm_every": 1,
             "clip": gw.clip.Norm(MAX_INF, norm_type=float("inf"))},
        ),
        "nan": _train(rank, {"sinks": [], "log_every": 100, "on_alert": "ignore"}, nan_step=NAN_STEP),
        "agc": _train(rank, {"sinks": [], "log_every": 2, "clip": gw.clip.AGC(AGC_CLIPPING, exclude_1d=True,
                                                                                 exclude=["4"])}),
    }


if __name__ == "__main__":
    C.run(worker, sys.argv[1])
