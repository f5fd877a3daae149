"""Hugging Face ``transformers``: gradwatch inside a ``Trainer``, as a ``TrainerCallback``.

The callback runs one gradwatch step in ``on_pre_optimizer_step``, which the Trainer calls once
per optimizer step (after the last accumulated micro-batch's backward), right before
``optimizer.step()``. Steps follow ``state.global_step``.

**Clipping order.** When ``TrainingArguments.max_grad_norm > 0`` (the default is 1.0) the Trainer
has already clipped the gradients when ``on_pre_optimizer_step`` runs, so gradwatch would see the
*clipped* gradients: the total norm can never exceed ``max_grad_norm`` and explosions are hidden.
Set ``max_grad_norm=0`` and let gradwatch clip (``clip=gw.clip.Norm(1.0)``): it records the
pre-clip statistics, reports the post-clip norm too, and applies the same clipping. The callback
warns once when it finds ``max_grad_norm > 0``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradwatch._options import check_callback_options
from gradwatch.errors import GradWatchWarning
from gradwatch.monitor import GradWatch, StepReport
from gradwatch.sinks.base import Sink

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "gradwatch.integrations.transformers needs Hugging Face transformers, which is not installed. "
        'Install it with `pip install "gradwatch[transformers]"` (or `pip install transformers`).'
    ) from exc

__all__ = ["GradWatchTrainerCallback"]



def _clip_message(max_grad_norm: float, clip: Any) -> str:
    if clip is not None:
        return (
            f"gradwatch: TrainingArguments.max_grad_norm={max_grad_norm:g} makes the Trainer clip before "
            f"on_pre_optimizer_step, so gradwatch sees clipped gradients and clips them again with {clip!r}. "
            "Set max_grad_norm=0 to let gradwatch alone clip and record the pre-clip statistics."
        )
    return (
        f"gradwatch: TrainingArguments.max_grad_norm={max_grad_norm:g} makes the Trainer clip before "
        "on_pre_optimizer_step, so gradwatch records clipped gradients (their total norm never exceeds "
        f"{max_grad_norm:g}). To record the pre-clip statistics, set max_grad_norm=0 and pass "
        f"clip=gw.clip.Norm({max_grad_norm:g}) to GradWatchTrainerCallback."
    )


class GradWatchTrainerCallback(TrainerCallback):
    """Run :class:`gradwatch.GradWatch` inside a Hugging Face ``Trainer``.

    Takes the same keyword options as :class:`~gradwatch.GradWatch` (``detectors``, ``clip``,
    ``on_nonfinite``, ``on_alert``, ``sinks``, ``log_every``, ``granularity``,
    ``track_activations``, ...), except ``scaler``, which comes from the Trainer's optimizer.

    * One gradwatch step per optimizer step, in ``on_pre_optimizer_step`` (after gradient
      accumulation and after the Trainer unscaled fp16 gradients), numbered by
      ``state.global_step``.
    * ``clip`` and ``on_nonfinite="skip"`` act as in a plain loop: a skipped step sets every
      ``.grad`` to ``None``, so ``optimizer.step()`` leaves weights and optimizer state unchanged
      (the learning-rate scheduler still advances, as the Trainer steps it unconditionally).
    * The Trainer clips *before* this hook when ``max_grad_norm > 0``: set ``max_grad_norm=0``
      and pass ``clip=gw.clip.Norm(...)`` so that gradwatch sees the pre-clip gradients; a
      :class:`~gradwatch.GradWatchWarning` says so once otherwise.
    * ``sinks=None`` means ``[gw.sinks.Console()]``; ``gw.sinks.Wandb()`` writes to the run the
      Trainer's ``report_to="wandb"`` opened. Only rank 0 writes.

    Attributes:
        monitor: the :class:`~gradwatch.GradWatch` of the current (or last) training, or ``None``.
        last_report: the :class:`~gradwatch.StepReport` of the last optimizer step.

    Raises:
        TypeError: an unknown keyword, or ``scaler``.
        ValueError: an option has a value outside its allowed set (same messages as ``GradWatch``).

    Example::

        from gradwatch.integrations.transformers import GradWatchTrainerCallback

        args = TrainingArguments(output_dir="out", max_grad_norm=0)  # gradwatch clips instead
        trainer = Trainer(model, args, train_dataset=ds,
                          callbacks=[GradWatchTrainerCallback(clip=gw.clip.Norm(1.0))])
    """

    def __init__(self, **options: Any) -> None:
        self.sinks: Sequence[Sink] | None = check_callback_options("GradWatchTrainerCallback", options, "the Trainer")
        self.options = dict(options)
        self.monitor: GradWatch | None = None
        self.last_report: StepReport | None = None
        self._warned = False

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        """Build the monitor on the Trainer's model; warn once if the Trainer clips first."""
        if model is None:
            raise ValueError("GradWatchTrainerCallback needs the Trainer's `model`; the Trainer passed none")
        if self.monitor is not None:
            self.monitor.close()
        max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        if max_grad_norm > 0 and not self._warned:
            self._warned = True
            warnings.warn(_clip_message(max_grad_norm, self.options.get("clip")), GradWatchWarning, stacklevel=2)
        opts = {k: v for k, v in self.options.items() if k != "sinks"}
        optimizer = kwargs.get("optimizer")
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer under fp16
        self.monitor = GradWatch(model, sinks=self.sinks, scaler=scaler, **opts)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Run one gradwatch step on the gradients the optimizer is about to apply."""
        monitor = self.monitor
        if monitor is None or monitor.closed:
            return
        optimizer = kwargs.get("optimizer")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.last_report = monitor.step(
            global_step=int(state.global_step),
            optimizer=inner if isinstance(inner, torch.optim.Optimizer) else None,  # its AMP stage is known
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Emit pending alerts and close the sinks."""
        if self.monitor is not None:
            self.monitor.close()
