"""gradwatch alerts in Weights & Biases, offline: no account or network needed.

Run:  python examples/wandb_alerts.py        (CPU, ~20 s)

Trains a deep sigmoid MLP (gradients vanish) and then hits it with an exploding learning-rate
spike, with ``gw.sinks.Wandb``:

* every logging step: ``grad_norm/*``, ``grad_max/*``, ``param_norm/*``, ``grad_to_param/*`` with
  ``gradwatch/step`` as their x-axis;
* every alert: ``run.alert(title="gradwatch: vanishing gradients in net.0", text=..., level="WARN")``
  with the figure, the step and the ranked remedies (W&B e-mails/Slacks them once synced);
* at the end: the ``gradwatch/alerts`` table and a layers x steps heatmap of the gradient norms.

The run is written offline under ``--dir`` (``WANDB_MODE=offline``); the script prints the
``wandb sync`` command that uploads it. With ``--lightning`` the same happens through
Lightning's ``WandbLogger`` and ``GradWatchCallback()``.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
import wandb
from torch import nn

import gradwatch as gw


def sigmoid_mlp(depth: int = 12, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 16
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Sigmoid()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def batches(n: int, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(size, 16, generator=g)
        out.append((x, torch.sin(x.sum(dim=1, keepdim=True))))
    return out


def plain(out: Path, steps: int) -> wandb.Run:
    run = wandb.init(project="gradwatch-examples", name="wandb-alerts", dir=out, mode="offline")
    torch.manual_seed(0)
    model = sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = gw.sinks.Wandb(run, alert_level="WARN", chart_every=50)
    monitor = gw.GradWatch(model, sinks=[sink, gw.sinks.Console(metrics=False)], log_every=5, on_alert="ignore")
    for step, (x, y) in enumerate(batches(steps)):
        loss = nn.functional.mse_loss(model(x), y)
        if step == steps - 20:
            loss = loss * 1e6  # a sudden blow-up: exploding / spiking gradients
        loss.backward()
        monitor.step()
        opt.step()
        opt.zero_grad()
    monitor.close()  # logs the heatmap and the alerts table
    print(f"\nW&B alerts sent: {[a.kind for a in monitor.alerts if a.severity != 'info']}")
    return run


def lightning(out: Path, steps: int) -> wandb.Run:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import WandbLogger

    from gradwatch.lightning import GradWatchCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = sigmoid_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    xs, ys = zip(*batches(steps))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=32)
    logger = WandbLogger(project="gradwatch-examples", name="wandb-alerts-lightning", save_dir=str(out), offline=True)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=logger, callbacks=[GradWatchCallback(log_every=5)],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Module(), data)
    return logger.experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/wandb_alerts"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lightning", action="store_true", help="go through Lightning's WandbLogger")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)  # models this small run fastest on one thread
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    out = args.dir.resolve()  # absolute: a wandb service shared with another process has its own cwd
    out.mkdir(parents=True, exist_ok=True)
    run = lightning(out, args.steps) if args.lightning else plain(out, args.steps)
    run_dir = Path(run.dir).parent  # .../wandb/offline-run-<date>-<id>
    wandb.finish()
    shown = run_dir.relative_to(Path.cwd()) if run_dir.is_relative_to(Path.cwd()) else run_dir
    print(f"offline run written to {shown}")
    print(f"upload it with:  wandb sync {shown}")


if __name__ == "__main__":
    main()
