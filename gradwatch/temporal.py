"""Temporal gradient profile of recurrent modules (``track_time=True``): vanishing across *time*.

Per-layer weight gradients cannot show why an LSTM beats a vanilla RNN: both have a handful of
weight tensors, and the recurrence multiplies along time, not depth. What shows it is the norm of
the loss gradient with respect to the recurrent module's input at each time step, ``||dL/dx_t||``:
when it collapses from the last step back to the first, nothing the sequence's start contains can
influence the weights.

For every ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` module a forward pre-hook attaches a tensor hook
to the module's input; the hook reduces the incoming gradient to one norm per time step on the
device and folds the summary into device buffers:

* ``time_grad_ratio/<layer>``: ``||dL/dx_first|| / ||dL/dx_last||`` (geometric mean over the
  forwards of the step);
* ``time_grad_decay/<layer>``: the mean factor per time step, ``ratio ** (1 / (T - 1))`` -- the
  gradient keeps this fraction of itself for each step it travels back in time.

Cost and semantics, decided here:

* The profile is taken only in forwards that precede a *logging* step (the monitor arms the
  hooks); every other step pays nothing, not even a hook call, and nothing ever reads a value back
  to the host outside the logging step's single transfer.
* When the input does not require grad (raw data), the forward pre-hook feeds the module a leaf
  alias of it (``x.detach().requires_grad_()``, same storage, no copy) so autograd computes
  ``dL/dx`` -- one extra matrix product per time step in the module's backward, on logging steps
  only. The caller's tensor is never modified, and no parameter gradient changes.
* The gradient is the one with respect to the module's *input* (the first layer of a stacked
  module). ``PackedSequence`` inputs are not profiled (their time steps are interleaved).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)
_TINY = 1e-30


@dataclass
class TimeProfile:
    """Per recurrent module, averaged over the profiled forwards since the last optimizer step.

    Attributes:
        log_ratio: mean of ``log(||dL/dx_first|| / ||dL/dx_last||)``.
        log_decay: mean of ``log_ratio / (T - 1)`` (log of the per-step factor).
        steps: time steps of the last profiled forward.
        seen: whether the module was profiled this step (only forwards before logging steps are).
    """

    log_ratio: Tensor
    log_decay: Tensor
    steps: Tensor
    seen: Tensor


def _time_dim(module: nn.Module, x: Tensor) -> int:
    if x.dim() == 2:  # unbatched (T, F)
        return 0
    return 1 if getattr(module, "batch_first", False) else 0


def step_norms(grad: Tensor, time_dim: int) -> Tensor:
    """L2 norm of ``grad`` over every dimension but ``time_dim``, in float32: one value per step."""
    g = grad.detach().float().movedim(time_dim, 0)
    return g.reshape(g.shape[0], -1).square().sum(1).sqrt()


class TimeProfiler:
    """Installs forward pre-hooks on the recurrent modules of ``model``.

    Args:
        model: the watched model.
        device: where the summary buffers live.
        armed: returns whether the coming forward precedes a logging step.
    """

    def __init__(self, model: nn.Module, device: torch.device, armed: Callable[[], bool]) -> None:
        self.names: list[str] = []
        self._armed = armed
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if isinstance(module, RECURRENT_TYPES):
                hook = self._make_hook(len(self.names))
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                self.names.append(name or type(module).__name__)
        n = len(self.names)
        self._device = device
        self._ratio = torch.zeros(n, device=device)
        self._decay = torch.zeros(n, device=device)
        self._steps = torch.zeros(n, device=device)
        self._count = torch.zeros(n, device=device)

    def _make_hook(self, i: int) -> Callable[..., Any]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self._handles or not torch.is_grad_enabled() or not self._armed():
                return None
            in_kwargs = not args and "input" in kwargs
            x = kwargs["input"] if in_kwargs else (args[0] if args else None)
            if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
                return None  # PackedSequence, or nothing to profile
            replaced = not x.requires_grad
            if replaced:
                x = x.detach().requires_grad_(True)
            t_dim = _time_dim(module, x)
            handle: list[RemovableHandle] = []

            def grad_hook(grad: Tensor) -> None:
                for h in handle:  # once per forward, even if the tensor is reused later
                    h.remove()
                handle.clear()
                self._record(i, step_norms(grad, t_dim))

            handle.append(x.register_hook(grad_hook))
            if not replaced:
                return None
            if in_kwargs:
                return args, {**kwargs, "input": x}
            return (x, *args[1:]), kwargs

        return pre_hook

    @torch.no_grad()
    def _record(self, i: int, norms: Tensor) -> None:
        t = norms.shape[0]
        if t == 0:
            return
        dev = self._device
        log_r = (norms[0].clamp_min(_TINY).log() - norms[-1].clamp_min(_TINY).log()).to(dev)
        self._ratio[i] += log_r
        self._decay[i] += log_r / max(t - 1, 1)
        self._steps[i] = float(t)
        self._count[i] += 1

    def take(self) -> TimeProfile:
        """Averages since the last call, then reset (device only)."""
        c = self._count.clamp_min(1)
        out = TimeProfile(self._ratio / c, self._decay / c, self._steps.clone(), self._count > 0)
        self._ratio = torch.zeros_like(self._ratio)
        self._decay = torch.zeros_like(self._decay)
        self._count = torch.zeros_like(self._count)
        return out

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
