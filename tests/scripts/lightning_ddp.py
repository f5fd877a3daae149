"""Lightning ``strategy="ddp"`` on 2 CPU processes (gloo) with GradWatchCallback.

Run as ``python tests/scripts/lightning_ddp.py OUT_DIR`` (Lightning re-launches this same command
for rank 1; that is why it is a script and not a pytest test). Writes:

* ``OUT_DIR/sink_rank{R}.jsonl``: what a sink saw, one file per rank that received records
  (the sink itself does not filter by rank: gradwatch must call it on rank 0 only);
* ``OUT_DIR/gw.jsonl``: the JSONL sink every rank builds with the same path;
* ``OUT_DIR/seen_rank{R}.json``: the norms each rank's LightningModule computed itself in
  ``on_before_optimizer_step`` (float64), and the world size;
* ``OUT_DIR/csv/``: the CSVLogger the ``LightningLoggers`` sink forwarded to.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import gradwatch as gw
from gradwatch.lightning import GradWatchCallback

warnings.simplefilter("ignore")


class RankRecorder:
    """A sink that writes whatever it receives to a file named after the calling rank."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def _write(self, record: dict) -> None:
        rank = dist.get_rank() if dist.is_initialized() else -1
        with open(self.out / f"sink_rank{rank}.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._write({"type": "metrics", "step": step, "grad_norm/total": metrics["grad_norm/total"]})

    def log_alert(self, alert: gw.Alert) -> None:
        self._write({"type": "alert", "kind": alert.kind, "step": alert.step})

    def close(self) -> None:
        pass


class Net(pl.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.out = out
        self.seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        sq = sum(float((p.grad.double() ** 2).sum()) for p in self.parameters() if p.grad is not None)
        self.seen.append([self.trainer.global_step, math.sqrt(sq)])

    def on_train_end(self) -> None:
        info = {"seen": self.seen, "world_size": self.trainer.world_size, "rank": self.trainer.global_rank}
        (self.out / f"seen_rank{self.trainer.global_rank}.json").write_text(json.dumps(info))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    cb = GradWatchCallback(
        log_every=1,
        sinks=[RankRecorder(out), gw.sinks.JSONL(out / "gw.jsonl"), gw.sinks.LightningLoggers()],
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=8,
        accumulate_grad_batches=2,
        callbacks=[cb],
        logger=CSVLogger(out, name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Net(out), loader)
    # Lightning leaves the gloo group up; torn down at interpreter exit, its threads race the destructor
    # ("terminate called without an active exception" on a loaded machine). Both ranks meet, then tear down.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
