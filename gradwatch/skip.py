"""Skipping a poisoned step: on the host (gradients set to ``None``) or on the device.

Two ways to keep non-finite gradients out of the weights (``on_nonfinite="skip"``):

* **host skip** (any optimizer): read the one non-finite flag back (a host-device sync) and, when
  set, set every ``.grad`` to ``None``, so ``optimizer.step()`` changes nothing.
* **device skip** (optimizers with ``_step_supports_amp_scaling``: Adam, AdamW, SGD and Adagrad
  with ``fused=True``): hand the device-side flag to the optimizer as ``optimizer.found_inf``,
  the attribute ``GradScaler`` uses. The fused kernels then leave the parameters and every state
  tensor (step count included) unchanged when it is set. No read, no sync. A ``found_inf``
  already set by a ``GradScaler`` is combined (the maximum), and gradwatch's own flag is removed
  by a step post-hook right after the optimizer's step.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from gradwatch.layers import Layer

HOST = "host"
DEVICE = "device"


def supports_device_skip(optimizer: Any) -> bool:
    """Whether ``optimizer``'s step honours ``found_inf`` on the device (fused Adam/AdamW/SGD/Adagrad)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return False
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def drop_grads_(layers: list[Layer]) -> None:
    """Set every gradient of ``layers`` to ``None`` (the host skip)."""
    for layer in layers:
        for p in layer.params:
            p.grad = None


class DeviceSkip:
    """Hands a device-side non-finite flag to fused optimizers, and takes it back after their step.

    One step post-hook per optimizer (removed by :meth:`remove`) deletes the flag gradwatch set,
    so a later step without gradwatch, or a ``GradScaler``, finds the optimizer as it was.
    """

    def __init__(self) -> None:
        self._hooks: dict[int, RemovableHandle] = {}
        self._ours: weakref.WeakKeyDictionary[torch.optim.Optimizer, Tensor] = weakref.WeakKeyDictionary()

    def arm(self, optimizer: torch.optim.Optimizer, flag: Tensor) -> None:
        """Make ``optimizer``'s coming step a no-op where ``flag`` (a bool device scalar) is set."""
        found = flag.to(torch.float32).reshape(())
        existing = getattr(optimizer, "found_inf", None)
        if isinstance(existing, Tensor) and self._ours.get(optimizer) is not existing:
            # A GradScaler's own flag (set in scaler.step right before optimizer.step): either skips.
            found = torch.maximum(existing.to(found.device, torch.float32).reshape(()), found)
            optimizer.found_inf = found  # type: ignore[attr-defined]
            return  # the scaler deletes it after the step
        optimizer.found_inf = found  # type: ignore[attr-defined]
        self._ours[optimizer] = found
        if id(optimizer) not in self._hooks:
            ours = self._ours

            def clear(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                mine = ours.pop(opt, None)
                if mine is not None and getattr(opt, "found_inf", None) is mine:
                    del opt.found_inf  # type: ignore[attr-defined]

            self._hooks[id(optimizer)] = optimizer.register_step_post_hook(clear)

    def remove(self) -> None:
        """Remove the post-hooks and any flag still set (the monitor is closing)."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        for opt, mine in list(self._ours.items()):
            if getattr(opt, "found_inf", None) is mine:
                del opt.found_inf  # type: ignore[attr-defined]
        self._ours = weakref.WeakKeyDictionary()
