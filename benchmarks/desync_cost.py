"""What the desync check costs and how far float32 rounding moves a fingerprint (CPU).

Usage: python benchmarks/desync_cost.py [--threads N] [--json PATH]

1. Rounding: the float32 fingerprint (norm and the ``K`` projections) of a random ``n``-element
   weight against the same fingerprint computed in float64, relative to the weight's norm: what
   a different summation order can move it by, to compare with ``REL_TOL``.
2. Cost per logging step on a 2-process gloo job (one process per rank, ``--threads`` each): the
   fingerprint of parameters and gradients, the one ``all_gather``, the comparison; against a
   training step (forward, backward, SGD step) of the same model, an MLP of width 1024 and depth 12
   (12.6 M parameters) on a batch of 64.
3. Detection margin: the relative parameter difference the check sees after rank 1 alone skips one
   optimizer step (cross-entropy; SGD lr 1e-3 and 0.1, AdamW lr 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "scripts"))

WIDTH, DEPTH, BATCH, REPEATS = 1024, 12, 64, 20


def rounding() -> list[dict[str, float]]:
    from gradwatch.desync import PROJECTIONS, REL_TOL, DesyncCheck, _projection_vectors, _Tracked

    check = DesyncCheck([])  # one process: only its fingerprint arithmetic is used here
    out = []
    g = torch.Generator().manual_seed(0)
    for side in (256, 1024, 4096, 8192):
        w64 = torch.randn(side, side, generator=g, dtype=torch.float64) * 0.02
        w32 = w64.float()
        u, v = _projection_vectors(0, side, side, PROJECTIONS, torch.device("cpu"))
        tracked = _Tracked(0, w32, (0,), u, v)
        f32 = check._sketch(w32, tracked).double()
        w = w32.double()  # the same float32 values, summed in float64
        f64 = torch.cat([w.norm().reshape(1), ((w @ v.double()) * u.double()).sum(0)])
        err = ((f32 - f64).abs().max() / f64[0]).item()
        out.append({"n": side * side, "float32_rel_error": err, "rel_tol": REL_TOL})
    return out


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers)


def _worker(rank: int, out_dir: str) -> dict[str, float]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradwatch.desync import DesyncCheck, compare
    from gradwatch.layers import discover_layers

    torch.set_num_threads(int(os.environ.get("DESYNC_THREADS", "1")))
    model = _model()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, WIDTH)
    check = DesyncCheck(discover_layers(model, "module"))

    def train_step() -> None:
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(3):
        train_step()
    ddp(x).square().mean().backward()
    names = ("train_step", "fingerprint", "all_gather", "compare", "check")
    timings: dict[str, list[float]] = {name: [] for name in names}
    for i in range(REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        mine = check.fingerprint(i)
        t1 = time.perf_counter()
        gathered = check._gather(mine)
        t2 = time.perf_counter()
        groups, layer_of = [t.groups for t in check.tracked], [t.layer for t in check.tracked]
        check.findings(compare(gathered, groups, layer_of, len(check.layer_names), check.rtol), i)
        t3 = time.perf_counter()
        check.check(i)
        t4 = time.perf_counter()
        timings["fingerprint"].append(t1 - t0)
        timings["all_gather"].append(t2 - t1)
        timings["compare"].append(t3 - t2)
        timings["check"].append(t4 - t3)
    for _ in range(REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        train_step()
        timings["train_step"].append(time.perf_counter() - t0)
    res: dict[str, float] = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in timings.items()}  # median, ms
    # What one step of different updates does: rank 1 alone skips one optimizer step (from the same
    # replicated weights, a cross-entropy over 10 classes); the next check's parameter difference.
    labels = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(0))
    for name, make in (("sgd_lr1e-3", lambda ps: torch.optim.SGD(ps, lr=1e-3)),
                       ("sgd_lr0.1", lambda ps: torch.optim.SGD(ps, lr=0.1)),
                       ("adamw_lr1e-4", lambda ps: torch.optim.AdamW(ps, lr=1e-4))):
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p, 0)
        o = make(model.parameters())
        for step in range(2):
            nn.functional.cross_entropy(ddp(x)[:, :10], labels).backward()
            if step == 1:
                check.check(100)
                assert check.last is not None and max(check.last.param_rel) == 0.0
            if not (rank == 1 and step == 1):
                o.step()
            o.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x)[:, :10], labels).backward()
        check.check(101)
        assert check.last is not None
        res[f"one_skipped_step_rel_{name}"] = max(check.last.param_rel)
        o.zero_grad(set_to_none=True)
    res["params"] = float(sum(p.numel() for p in model.parameters()))
    res["payload_floats"] = float(mine.numel())
    res["projection_floats"] = float(check.projection_floats)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    os.environ["DESYNC_THREADS"] = str(args.threads)
    import tempfile

    import dist_common as C

    out: dict[str, object] = {"rounding": rounding()}
    with tempfile.TemporaryDirectory() as d:
        C.run(_worker, d)
        with open(os.path.join(d, "rank0.json"), encoding="utf-8") as fh:
            out["cost_ms_median_rank0"] = json.load(fh)
    out.update(threads_per_rank=args.threads, torch=torch.__version__, model=f"MLP {DEPTH}x{WIDTH}, batch {BATCH}")
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
