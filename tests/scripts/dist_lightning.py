"""Lightning with GradWatchCallback: one CPU process, or 2 gloo ranks with ``strategy="ddp"`` or
FSDP2 (``ModelParallelStrategy`` + ``fully_shard`` in ``configure_model``). Run by
tests/test_distributed_lightning.py; Lightning re-launches this same command line for rank 1.

Usage: python dist_lightning.py {single,ddp,fsdp2} OUT_DIR

Every run sees the same global batches (``dist_common.batch``): 8 samples per optimizer step,
split 4/4 over the ranks by Lightning's ``DistributedSampler``. Writes ``OUT_DIR/records.jsonl``
(a JSONL sink every rank builds with the same path: rank 0 alone writes) and
``OUT_DIR/rank{R}.json`` (layers, steps taken by the rank's monitor, world size).

(Lightning's own ``strategy="fsdp"`` is FSDP1 and refuses ``accelerator="cpu"``; FSDP2 through
``ModelParallelStrategy`` is Lightning's way to shard on CPU.)
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch.lightning import GradWatchCallback  # noqa: E402

STEPS = 4
warnings.simplefilter("ignore")


class RankSlice(torch.utils.data.Sampler):
    """Samples r, r + W, r + 2W, ... of rank r: with a batch of GLOBAL_BATCH / W per rank, the ranks'
    batches of a step make up exactly the global batch of that step. (Lightning's own
    DistributedSampler shuffles training data.)"""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // C.WORLD


class Net(pl.LightningModule):
    def __init__(self, out: Path, shard: bool) -> None:
        super().__init__()
        self.net = C.make_model()
        self.out = out
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return C.loss_fn(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(mode: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    xs, ys = zip(*(C.batch(step) for step in range(STEPS)))
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    world = 1 if mode == "single" else C.WORLD
    sampler = RankSlice(len(data)) if world > 1 else None
    loader = torch.utils.data.DataLoader(data, batch_size=C.GLOBAL_BATCH // world, sampler=sampler)
    if mode == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: object = ModelParallelStrategy(data_parallel_size=C.WORLD, tensor_parallel_size=1)
    else:
        strategy = "ddp" if mode == "ddp" else "auto"
    callback = GradWatchCallback(
        sinks=[gw.sinks.JSONL(out / "records.jsonl")], log_every=1, grad_max_every=1, param_norm_every=1,
        on_alert="ignore",
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=STEPS,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Net(out, shard=mode == "fsdp2"), loader)
    assert callback.monitor is not None
    info = {"layers": callback.monitor.layers, "steps": callback.monitor.step_count, "world_size": trainer.world_size}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
    # Lightning leaves the gloo group up; torn down at interpreter exit its threads can race the destructor
    # ("terminate called without an active exception"). Both ranks meet, then tear down.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
