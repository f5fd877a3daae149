"""Optional activation tracking (``track_activations=True``): dead ReLUs and saturated sigmoid/tanh.

Forward hooks on activation modules fold each training forward's output into device buffers
(no host reads); the monitor turns them into per-module fractions once per optimizer step, so
micro-batches of an accumulated step are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
SIGMOID_TYPES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
TANH_TYPES: tuple[type[nn.Module], ...] = (nn.Tanh, nn.Hardtanh)


def activation_kind(module: nn.Module) -> str | None:
    """``"relu"``, ``"sigmoid"``, ``"tanh"`` for tracked activation modules, else ``None``."""
    if isinstance(module, RELU_TYPES):
        return "relu"
    if isinstance(module, SIGMOID_TYPES):
        return "sigmoid"
    if isinstance(module, TANH_TYPES):
        return "tanh"
    return None


@dataclass
class ActivationStats:
    """Per activation module, averaged over the forwards since the last optimizer step."""

    dead: Tensor  # fraction of units zero on the whole batch (ReLU family)
    saturated: Tensor  # fraction of outputs near the asymptotes (sigmoid / tanh)
    seen: Tensor  # bool: the module ran in a training forward
    active: Tensor | None = None  # fraction of outputs > 0, per sample and unit (ReLU family; He init assumes 1/2)


def _unit_dims(y: Tensor) -> tuple[int, ...]:
    # Features are the last dim for (N, F) and (N, T, F); channels are dim 1 for conv maps.
    if y.dim() <= 1:
        return tuple(range(y.dim()))
    if y.dim() in (2, 3):
        return tuple(range(y.dim() - 1))
    return (0, *range(2, y.dim()))


class ActivationTracker:
    """Installs forward hooks on the tracked activation modules of ``model``."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.names: list[str] = []
        self.kinds: list[str] = []
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            kind = activation_kind(module)
            if kind is None:
                continue
            self._handles.append(module.register_forward_hook(self._make_hook(len(self.names), kind)))
            self.names.append(name)
            self.kinds.append(kind)
        n = len(self.names)
        self._dead = torch.zeros(n, device=device)
        self._sat = torch.zeros(n, device=device)
        self._active = torch.zeros(n, device=device)
        self._count = torch.zeros(n, device=device)

    def _make_hook(self, i: int, kind: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor) or output.numel() == 0:
                return
            with torch.no_grad():
                y = output.detach()
                dev = self._count.device
                if kind == "relu":
                    # A unit is alive when its largest output is > 0 (ReLU-family outputs are >= 0);
                    # amax over the batch dims is ~20x faster on CPU than (y > 0).any(dim=...).
                    alive = y.amax(dim=_unit_dims(y)) > 0 if y.dim() else y > 0
                    self._dead[i] += (1.0 - alive.float().mean()).to(dev)
                    self._active[i] += (y > 0).float().mean().to(dev)
                elif kind == "sigmoid":
                    self._sat[i] += ((y < 0.01) | (y > 0.99)).float().mean().to(dev)
                else:
                    self._sat[i] += (y.abs() > 0.99).float().mean().to(dev)
                self._count[i] += 1

        return hook

    def take(self) -> ActivationStats:
        """Averages since the last call, then reset (device only)."""
        c = self._count.clamp_min(1)
        out = ActivationStats(
            dead=self._dead / c, saturated=self._sat / c, seen=self._count > 0, active=self._active / c
        )
        self._dead = torch.zeros_like(self._dead)
        self._sat = torch.zeros_like(self._sat)
        self._active = torch.zeros_like(self._active)
        self._count = torch.zeros_like(self._count)
        return out

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
