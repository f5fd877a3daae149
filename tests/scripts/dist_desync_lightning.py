"""Lightning ``strategy="ddp"`` on 2 CPU processes (gloo) with GradWatchCallback: the desync check
stays silent on a healthy run. Run by tests/test_desync.py; Lightning re-launches this same command
line for rank 1.

Usage: python dist_desync_lightning.py OUT_DIR

``STEPS`` optimizer steps, a logging step (and so a comparison of the replicas) at every one. Each
rank writes ``OUT_DIR/rank{R}.json``: the alert kinds its monitor recorded, the comparisons made,
the largest relative difference they saw, the parameters compared, and the ``all_gather`` calls
made during ``fit`` (counted by wrapping ``torch.distributed.all_gather``; the calls go through).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C  # noqa: E402

from gradwatch.lightning import GradWatchCallback  # noqa: E402

STEPS = 120
warnings.simplefilter("ignore")


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = C.make_model()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return C.loss_fn(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    n = STEPS * C.GLOBAL_BATCH
    data = torch.utils.data.TensorDataset(torch.randn(n, C.IN_FEATURES, generator=g), torch.randn(n, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=C.GLOBAL_BATCH // C.WORLD)
    callback = GradWatchCallback(sinks=[], log_every=1, on_alert="ignore")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=C.WORLD,
        strategy="ddp",
        max_steps=STEPS,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    gathers = 0
    orig = dist.all_gather

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal gathers
        gathers += 1
        return orig(*args, **kwargs)

    dist.all_gather = counting
    try:
        trainer.fit(Net(), loader)
    finally:
        dist.all_gather = orig
    monitor = callback.monitor
    assert monitor is not None
    check = monitor._desync
    info = {
        "world_size": trainer.world_size,
        "steps": monitor.step_count,
        "kinds": sorted({a.kind for a in monitor.alerts}),
        "active": check is not None,
        "checks": check.checks if check is not None else 0,
        "largest": check.largest if check is not None else None,
        "tracked": len(check.tracked) if check is not None else 0,
        "all_gather": gathers,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
    # Lightning leaves the gloo group up; torn down at interpreter exit its threads can race the destructor
    # ("terminate called without an active exception"). Both ranks meet, then tear down.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
