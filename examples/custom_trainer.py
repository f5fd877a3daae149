"""A hand-rolled trainer driving gradwatch through its public step API only.

Run:  python examples/custom_trainer.py        (CPU, a few seconds)

What any trainer (Accelerate, Composer, your own) needs, and nothing more:

* ``monitor.step(global_step=..., loss=..., optimizer=...)`` once per optimizer step, after the
  last accumulated micro-batch's backward: the trainer's own step number, the step's loss (kept on
  the device), and the optimizer about to step (a fused one skips a poisoned step on the device);
* ``monitor.state_dict()`` / ``load_state_dict()`` in the checkpoint, so a resumed run neither
  re-warms its detectors nor repeats its alerts;
* ``monitor.closed`` and ``monitor.close()``.

The model is a 10-layer sigmoid MLP (its gradients vanish: one alert before the checkpoint, none
repeated after the resume). Records go to runs/custom_trainer/grads.jsonl, appended to on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw

ACCUMULATE = 4  # micro-batches per optimizer step
RUN = Path("runs/custom_trainer")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 1))


def micro_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 16, generator=g)
    return x, x[:, :1].sin()


class Trainer:
    """Owns the model, the optimizer, a global step and a gradwatch monitor."""

    def __init__(self, *, append: bool) -> None:
        self.model = make_model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=True)
        self.global_step = 0
        self.monitor = gw.GradWatch(
            self.model,
            sinks=[gw.sinks.JSONL(RUN / "grads.jsonl", append=append)],
            log_every=10,
            on_alert="ignore",
        )

    def fit(self, until: int) -> None:
        while self.global_step < until:
            total = torch.zeros(())
            for k in range(ACCUMULATE):
                x, y = micro_batch(self.global_step * ACCUMULATE + k)
                loss = F.mse_loss(self.model(x), y) / ACCUMULATE
                loss.backward()
                total += loss.detach()
            self.monitor.step(global_step=self.global_step, loss=total, optimizer=self.optimizer)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1

    def checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
            "gradwatch": self.monitor.state_dict(),
        }

    def resume(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.global_step = ckpt["global_step"]
        self.monitor.load_state_dict(ckpt["gradwatch"])


def main() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    (RUN / "grads.jsonl").unlink(missing_ok=True)  # this example starts a fresh run each time
    first = Trainer(append=False)
    first.fit(until=30)
    torch.save(first.checkpoint(), RUN / "ckpt.pt")
    first.monitor.close()
    print(f"first run: steps 0-{first.global_step - 1}, alerts: {[(a.kind, a.step) for a in first.monitor.alerts]}")

    second = Trainer(append=True)  # a new process would do the same
    second.resume(torch.load(RUN / "ckpt.pt", weights_only=False))
    second.fit(until=60)
    second.monitor.close()
    print(f"resumed at step 30: steps 30-{second.global_step - 1}, "
          f"new alerts: {[(a.kind, a.step) for a in second.monitor.alerts if a.step >= 30]}")
    print(f"closed: {second.monitor.closed}")
    print(f"records: {RUN / 'grads.jsonl'}")


if __name__ == "__main__":
    main()
