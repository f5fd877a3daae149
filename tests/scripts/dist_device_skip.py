"""2-process DDP on CPU (gloo), fused AdamW, the device-side skip; run by tests/test_device_skip.py.

Usage: python dist_device_skip.py OUT_DIR

A NaN is written into rank 1's gradient at step ``NAN_STEP``, after DDP's all-reduce, so only rank 1
sees it. ``monitor.step(optimizer=opt)`` hands the non-finite flag, max-reduced over the ranks on
the device, to the fused optimizer (``found_inf``): both ranks skip the step without reading the
flag back. Per step, each rank records its host reads and its all-reduces.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist_common as C  # noqa: E402
from _syncs import count_syncs  # noqa: E402

import gradwatch as gw  # noqa: E402

STEPS = 8
NAN_STEP = 3
LOG_EVERY = 4


def worker(rank: int, out_dir: str) -> dict[str, Any]:
    model = C.make_model()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    monitor = gw.GradWatch(ddp, sinks=[gw.sinks.JSONL(os.path.join(out_dir, "skip.jsonl"))],
                           log_every=LOG_EVERY, on_alert="ignore")
    reads, collectives, skipped, equal, finite = [], [], [], [], []
    for step in range(STEPS):
        x, y = C.batch(step)
        C.loss_fn(ddp(C.shard(x, rank)), C.shard(y, rank)).backward()
        if step == NAN_STEP and rank == 1:
            with torch.no_grad():
                model[2].weight.grad[0, 0] = float("nan")
        with C.CountAllReduce() as count, count_syncs() as syncs:
            report = monitor.step(optimizer=opt)
            opt.step()
        reads.append(len(syncs))
        collectives.append(count.calls)
        skipped.append(report.skipped)
        opt.zero_grad(set_to_none=True)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        equal.append(all(torch.equal(gathered[0], g) for g in gathered[1:]))
        finite.append(all(math.isfinite(v) for v in C.flat_params(model)))
    monitor.close()
    return {
        "rank": rank,
        "skip_mode": monitor.skip_mode,
        "reads": reads,
        "collectives": collectives,
        "skipped": skipped,
        "weights_equal": equal,
        "weights_finite": finite,
        "skipped_steps": monitor.skipped_steps,
        "found_inf_left": hasattr(opt, "found_inf"),
        "adam_steps": [float(s["step"]) for s in opt.state_dict()["state"].values()],
    }


if __name__ == "__main__":
    C.run(worker, sys.argv[1])
