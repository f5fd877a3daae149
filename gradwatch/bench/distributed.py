"""Data-parallel cases: 2 gloo ranks on CPU whose replicas drift apart (``desync``), and a healthy control.

Each case runs in its own interpreter (``Case(subprocess=True)``), which is rank 0 and spawns rank 1
with ``torch.multiprocessing``; every rank trains its DDP replica with the bench's monitor
(:func:`~gradwatch.bench.loop.monitor_for`) on its half of each global batch, and the case scores
rank 0's alerts (every rank reaches the same verdict: the check compares all ranks' fingerprints).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.bench import data
from gradwatch.bench.loop import monitor_for, seeded, trial_from, watch_step
from gradwatch.bench.models import mlp
from gradwatch.bench.registry import Case, Trial, register

WORLD = 2
GLOBAL_BATCH = 64
STEPS = 60
SKIP_STEP = 15  # rank 1's rank-local guard skips its optimizer.step() here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, fault: str, steps: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y = data.teacher_classes()
        seeded(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        model = mlp([20, 64, 64, 5], nn.ReLU)
        ddp = DDP(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = monitor_for(ddp)
        per = GLOBAL_BATCH // WORLD
        for step in range(steps):
            start = (step * GLOBAL_BATCH) % (x.shape[0] - GLOBAL_BATCH + 1) + rank * per
            xb, yb = x[start : start + per], y[start : start + per]
            forward = ddp.module if fault == "module" else ddp  # the bug: the wrapped module, not the wrapper
            loss = F.cross_entropy(forward(xb), yb)
            loss.backward()
            watch_step(monitor, loss, opt)
            if not (fault == "skip" and rank == 1 and step == SKIP_STEP):
                opt.step()
            opt.zero_grad(set_to_none=True)
        trial = trial_from(monitor, steps)
        dist.barrier()  # no rank tears gloo down while another still talks
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(trial.to_dict(), fh)


def _job(fault: str, steps: int = STEPS) -> Trial:
    """Run the 2-rank job; rank 0's trial (rank 1's must agree on every alert's kind and step).

    Rank 0 runs in this interpreter (already a fresh one: the case is a subprocess case), rank 1 in a
    spawned process: one interpreter start fewer.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        other = mp.get_context("spawn").Process(target=_rank, args=(1, fault, steps, port, out))
        other.start()
        try:
            _rank(0, fault, steps, port, out)
        finally:
            other.join(timeout=60)
        if other.exitcode != 0:
            raise RuntimeError(f"rank 1 exited with status {other.exitcode}")
        trials = []
        for r in range(WORLD):
            with open(os.path.join(out, f"rank{r}.json"), encoding="utf-8") as fh:
                trials.append(Trial.from_dict(json.load(fh)))
    kinds = [[(a.kind, a.step) for a in t.alerts] for t in trials]
    if any(k != kinds[0] for k in kinds[1:]):
        raise RuntimeError(f"the ranks raised different alerts: {kinds}")
    return trials[0]


def _register(name: str, source: str, summary: str, fault: str, **kw: Any) -> None:
    register(Case(name=name, source=source, summary=summary, run=lambda: _job(fault), subprocess=True,
                  timeout_s=180.0, **kw))


_register(
    "traincheck_ddp_module_forward", "TrainCheck",
    "DDP on 2 gloo ranks, the loop calls ddp.module(x) instead of ddp(x): the gradient all-reduce never runs "
    "and each rank trains its own copy", "module", expect="desync", remedy=("distributed",),
)
_register(
    "gradwatch_ddp_rank_skips_step", "gradwatch",
    f"DDP on 2 gloo ranks, rank 1 alone skips optimizer.step() at step {SKIP_STEP} (a guard on its own batch's "
    "loss): the replicas part", "skip", expect="desync", remedy=("distributed",),
)
_register(
    "control_ddp_two_ranks", "gradwatch",
    "healthy DDP on 2 gloo ranks: ReLU MLP on the teacher classes, SGD lr 0.1, half of each batch per rank",
    "none",
)
