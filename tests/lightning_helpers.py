"""Tiny Lightning modules and a recording logger for the Lightning, W&B and TensorBoard tests.

Everything is built for a given Lightning package (``lightning.pytorch`` or ``pytorch_lightning``),
since a Trainer only accepts modules, loggers and callbacks of its own package.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch import nn

PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def pl_package(name: str = "lightning.pytorch") -> Any:
    """Import a Lightning package by name."""
    return importlib.import_module(name)


def ref_norm(params: Any) -> float | None:
    """Total L2 norm of the present gradients, in float64 (an independent reference)."""
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    if not grads:
        return None
    return math.sqrt(sum(float((g * g).sum()) for g in grads))


def loader(n: int = 64, batch: int = 4, d_in: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    """A fixed regression data set."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def make_module_class(pl: Any) -> type:
    """A LightningModule class of package ``pl`` that records what it sees of its gradients."""

    class Net(pl.LightningModule):
        """MLP regression; records the reference norm in its own ``on_before_optimizer_step``."""

        def __init__(
            self,
            depth: int = 2,
            width: int = 16,
            act: str = "tanh",
            lr: float = 0.05,
            opt: str = "sgd",
            nan_at: int | None = None,
            fused: bool = False,
            d_in: int = 8,
        ) -> None:
            super().__init__()
            acts = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}
            layers: list[nn.Module] = []
            dims = [d_in] + [width] * depth
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [nn.Linear(a, b), acts[act]()]
            layers.append(nn.Linear(dims[-1], 1))
            self.net = nn.Sequential(*layers)
            self.lr, self.opt, self.nan_at, self.fused = lr, opt, nan_at, fused
            self.seen: list[tuple[int, float | None]] = []  # (global_step, norm) in on_before_optimizer_step
            self.after: list[tuple[int, float | None]] = []  # (global_step, norm) after the optimizer step
            self.snapshots: dict[str, list[torch.Tensor]] = {}
            self.opt_states: dict[str, Any] = {}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            if self.nan_at is not None and self.trainer.global_step == self.nan_at:
                loss = loss * float("nan")
            return loss

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            self.seen.append((self.trainer.global_step, ref_norm(self.parameters())))

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.snapshots.setdefault(f"before{self.trainer.global_step}",
                                      [p.detach().clone() for p in self.parameters()])
            opt = self.trainer.optimizers[0]
            self.opt_states.setdefault(f"before{self.trainer.global_step}", _clone_state(opt.state_dict()))

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            # Lightning zeroes the gradients at the start of the next step: these are the applied ones.
            self.after.append((self.trainer.global_step, ref_norm(self.parameters())))

        def configure_optimizers(self) -> Any:
            if self.opt == "adam":
                return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused or None)
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return Net


def _clone_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone_state(v) for v in state]
    return state


def make_logger_class(pl: Any) -> type:
    """A real Lightning ``Logger`` of package ``pl`` that keeps every ``log_metrics`` call."""

    loggers = importlib.import_module(pl.__name__ + ".loggers")

    class RecordingLogger(loggers.Logger):
        def __init__(self, fail: bool = False) -> None:
            super().__init__()
            self.calls: list[tuple[int | None, dict[str, float]]] = []
            self.saves = 0
            self.fail = fail

        @property
        def name(self) -> str:
            return "recording"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            return None

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if self.fail:
                raise OSError("disk full")
            self.calls.append((step, dict(metrics)))

        def save(self) -> None:
            self.saves += 1

        def gradwatch_records(self) -> list[tuple[int | None, dict[str, float]]]:
            """The calls that came from gradwatch (they carry ``grad_norm/total``)."""
            return [(s, m) for s, m in self.calls if "grad_norm/total" in m]

    return RecordingLogger


def trainer_kwargs(**over: Any) -> dict[str, Any]:
    """Quiet, fast CPU Trainer settings."""
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    kw.update(over)
    return kw


def sigmoid_stack(seed: int = 0) -> nn.Module:
    """Deep sigmoid MLP (a LightningModule), PyTorch default init: the textbook vanishing case."""
    torch.manual_seed(seed)
    return make_module_class(pl_package())(depth=10, width=32, act="sigmoid")


def train_plain(monitor: Any, model: nn.Module, steps: int) -> None:
    """A plain SGD loop over :func:`loader` with ``monitor.step()`` before each optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i, (x, y) in enumerate(loader()):
        if i == steps:
            break
        torch.nn.functional.mse_loss(model(x), y).backward()
        monitor.step()
        opt.step()
        opt.zero_grad()
