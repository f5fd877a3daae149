"""gradwatch in a Lightning Trainer: one callback, metrics to every logger, alerts on the console.

Run:  python examples/lightning_callback.py        (CPU, ~15 s)

A 10-layer sigmoid MLP (its gradients vanish toward the input) trained with gradient accumulation (4 micro-batches per
optimizer step) and Lightning's own ``gradient_clip_val``; a NaN loss is injected at one step.
gradwatch:

* reads the accumulated gradients once per optimizer step, before Lightning clips them (the
  pre-clip norm is what it reports), with ``trainer.global_step`` as the step;
* sends ``grad_norm/*``, ``grad_max/*``, ... to every logger (here CSV and TensorBoard) with
  ``log_metrics(metrics, step=trainer.global_step)``;
* prints alerts with ranked remedies above the progress bar, and writes them as TensorBoard text;
* skips the poisoned step: the weights do not change;
* checkpoints its state with the Trainer, so ``fit(ckpt_path=...)`` continues it.

Works the same with ``import pytorch_lightning as pl``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from gradwatch.lightning import GradWatchCallback

NAN_AT = 12  # optimizer step whose loss is poisoned


class Regressor(pl.LightningModule):
    def __init__(self, depth: int = 10, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 16
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.Sigmoid()]  # sigmoid' <= 1/4: gradients shrink layer by layer
            d = width
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)
        self.snapshots: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        if self.trainer.global_step == NAN_AT:
            loss = loss * float("nan")
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        step = self.trainer.global_step
        if step in (NAN_AT, NAN_AT + 1) and step not in self.snapshots:
            self.snapshots[step] = [p.detach().clone() for p in self.parameters()]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_callback"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)  # models this small run fastest on one thread
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 16, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    loggers = [CSVLogger(args.out, name="csv", version=0)]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(args.out, name="tb", version=0))
    callback = GradWatchCallback(log_every=5, on_alert="ignore")  # sinks=None: the Trainer's loggers
    module = Regressor()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=4,
        gradient_clip_val=1.0,
        callbacks=[callback],
        logger=loggers,
        log_every_n_steps=5,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader)
    ckpt = args.out / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    monitor = callback.monitor
    unchanged = all(torch.equal(a, b) for a, b in zip(module.snapshots[NAN_AT], module.snapshots[NAN_AT + 1]))
    print(f"\noptimizer steps: {trainer.global_step} (from {trainer.global_step * 4} micro-batches)")
    print(f"alerts: {[(a.kind, a.step, a.layer) for a in monitor.alerts]}")
    print(f"skipped steps: {monitor.skipped_steps} (NaN injected at step {NAN_AT}; weights unchanged: {unchanged})")
    rows = list(csv.DictReader(open(Path(loggers[0].log_dir) / "metrics.csv")))
    gw_rows = [r for r in rows if r.get("grad_norm/total")]
    print("CSV rows from gradwatch (step, pre-clip grad_norm/total):")
    for r in gw_rows:
        print(f"  {int(r['step']):3d}  {float(r['grad_norm/total']):.4g}")

    # Resume: a new Trainer continues the monitor's step counter, detector and alert state.
    resumed = GradWatchCallback(log_every=5, on_alert="ignore")
    trainer2 = pl.Trainer(accelerator="cpu", max_epochs=2, accumulate_grad_batches=4, gradient_clip_val=1.0,
                          callbacks=[resumed], logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False)
    trainer2.fit(Regressor(), loader, ckpt_path=ckpt)
    print(f"resumed: monitor steps {monitor.step_count} -> {resumed.monitor.step_count}, "
          f"alerts carried over: {len(resumed.monitor.alerts) >= len(monitor.alerts)}")
    print(f"logs: {args.out}/csv, {args.out}/tb  (tensorboard --logdir {args.out})")


if __name__ == "__main__":
    main()
