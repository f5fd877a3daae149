"""Lightning callback: gradwatch inside a ``Trainer``, for ``lightning.pytorch`` and ``pytorch_lightning``.

The callback reads the gradients in ``on_before_optimizer_step``, which Lightning calls once per
optimizer step, after the last accumulated micro-batch's backward and after AMP unscaling, and
before it clips with ``gradient_clip_val``. So the records describe exactly what the optimizer is
about to apply, and the pre-clip norm is the one reported.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from gradwatch._options import _check_bool, check_callback_options
from gradwatch.monitor import GradWatch, StepReport
from gradwatch.preflight import PreflightReport, run_callback_preflight
from gradwatch.sinks.base import Sink
from gradwatch.sinks.console import Console
from gradwatch.sinks.lightning_loggers import LightningLoggers, is_logger_of

__all__ = ["GradWatchCallback"]


def _callback_bases() -> tuple[type, ...]:
    # A Trainer checks ``isinstance(cb, Callback)`` against its own package's class, and
    # ``lightning.pytorch`` and ``pytorch_lightning`` are two distinct hierarchies: derive from
    # every one that is installed so the same callback works with either Trainer.
    bases = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        if importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError:  # pragma: no cover - broken installs
            continue
    if not bases:
        raise ModuleNotFoundError(
            "gradwatch.lightning needs Lightning, which is not installed. "
            "Install it with `pip install lightning` (or `pip install pytorch-lightning`)."
        )
    return tuple(bases)


_BASES = _callback_bases()


def _scaler(trainer: Any) -> Any:
    """The Trainer's AMP ``GradScaler`` (``16-mixed``), or ``None``.

    Lightning's AMP plugin unscales before ``on_before_optimizer_step`` except for optimizers
    that unscale inside their own step (fused Adam & co.); given the scaler and the optimizer,
    the monitor reads the optimizer's AMP stage and divides still-scaled statistics by the scale,
    and leaves inf/NaN overflow to the scaler, which skips those steps itself.
    """
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


def _stable(value: Any) -> Any:
    """A representation of an option that is the same in every process (no memory addresses)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(_stable(v)) for v in value) + "]"
    if type(value).__repr__ is object.__repr__:
        return type(value).__qualname__
    return repr(value)


def _printer(trainer: Any) -> Any:
    # The progress bar's ``print`` writes above the bar instead of tearing it.
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and callable(getattr(bar, "print", None)):
        return bar.print  # TQDM writes above the bar; Rich's live display captures print()
    return None


class GradWatchCallback(*_BASES):  # type: ignore[misc]
    """Run :class:`gradwatch.GradWatch` inside a Lightning ``Trainer``.

    Takes the same keyword options as :class:`~gradwatch.GradWatch` (``detectors``, ``clip``,
    ``on_nonfinite``, ``on_alert``, ``sinks``, ``log_every``, ``granularity``,
    ``track_activations``, ...), except ``scaler``, which comes from the Trainer's precision
    plugin. It works with ``lightning.pytorch`` and ``pytorch_lightning`` Trainers alike.

    * Gradients are read in ``on_before_optimizer_step``: once per optimizer step (after the last
      accumulated micro-batch; with several optimizers, once per ``optimizer.step()``), after AMP
      unscaling, before Lightning's ``gradient_clip_val`` clipping. A fused optimizer's
      still-scaled gradients are divided by the scaler's scale. Steps are
      ``trainer.global_step``.
    * ``clip`` and ``on_nonfinite="skip"`` act as in a plain loop: a skipped step sets every
      ``.grad`` to ``None``, so Lightning's clipping and the optimizer leave weights and
      optimizer state unchanged.
    * ``sinks=None``: metrics go to every logger in ``trainer.loggers`` through
      ``log_metrics(metrics, step=trainer.global_step)`` on rank 0; alerts are printed once on
      rank 0 through the progress bar's ``print`` (or stderr), written as text to a
      ``TensorBoardLogger``, and sent as W&B alerts (``run.alert``) on the run of each
      ``WandbLogger``, which also gets the per-layer heatmap and the alerts table.
      A ``gw.sinks.LightningLoggers()`` in an explicit ``sinks`` list is bound to
      ``trainer.loggers`` the same way.
    * ``preflight=True`` runs :func:`gradwatch.preflight` on the first training batch, before the
      first step (on a copy of the module and of its first optimizer, with ``training_step`` as the
      loss), prints the report on rank 0 and keeps it as ``preflight_report``; with
      ``on_alert="raise"`` a finding stops the fit before it starts.
    * ``state_dict``/``load_state_dict`` carry the step, detector, clipper and alert state, so
      a Trainer resumed with ``ckpt_path`` neither re-warms nor re-alerts. ``state_key`` is built
      from the configuration.

    Attributes:
        monitor: the :class:`~gradwatch.GradWatch` of the current (or last) fit, or ``None``.
        last_report: the :class:`~gradwatch.StepReport` of the last optimizer step.
        preflight_report: the :class:`~gradwatch.PreflightReport` of ``preflight=True``, or ``None``.

    Raises:
        TypeError: an unknown keyword, or ``scaler``.
        ValueError: an option has a value outside its allowed set (same messages as ``GradWatch``).

    Example::

        from gradwatch.lightning import GradWatchCallback

        trainer = Trainer(callbacks=[GradWatchCallback(clip=gw.clip.Norm(1.0))], logger=WandbLogger())
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.sinks: Sequence[Sink] | None = check_callback_options(
            "GradWatchCallback", options, "the Trainer's precision plugin", extra=("preflight",)
        )
        _check_bool("preflight", options.get("preflight", False))
        self.options = dict(options)
        self.preflight_report: PreflightReport | None = None
        self.monitor: GradWatch | None = None
        self.last_report: StepReport | None = None
        self._pending_state: dict[str, Any] | None = None
        self._loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def state_key(self) -> str:
        """Checkpoint key built from the configuration (two differently configured callbacks can share a checkpoint)."""
        config = {
            k: _stable(v) for k, v in sorted(self.options.items()) if k not in ("sinks", "on_alert", "preflight")
        }
        return self._generate_state_key(**config)

    def _build_sinks(self, trainer: Any) -> list[Sink]:
        if self.sinks is not None:
            for s in self.sinks:
                if isinstance(s, LightningLoggers) and s.loggers is None:
                    s.bind(trainer.loggers)
            return list(self.sinks)
        printer = _printer(trainer)
        sinks: list[Sink] = [LightningLoggers(trainer.loggers), Console(metrics=False, printer=printer)]
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                if is_logger_of(lg, "WandbLogger"):
                    from gradwatch.sinks.wandb import Wandb

                    sinks.append(Wandb(run=lambda lg=lg: lg.experiment, metrics=False, step_key="trainer/global_step"))
        return sinks

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the monitor on the (already wrapped and placed) LightningModule."""
        if self.monitor is not None:
            previous = self.monitor
            previous.close()
            if self._pending_state is None:
                self._pending_state = previous.state_dict()
        opts = {k: v for k, v in self.options.items() if k not in ("sinks", "preflight")}
        self.monitor = GradWatch(pl_module, sinks=self._build_sinks(trainer), scaler=_scaler(trainer), **opts)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """With ``preflight=True``: check the model on the first training batch before its first step."""
        if self.options.get("preflight") and self.preflight_report is None and int(trainer.global_step) == 0:
            self.preflight_report = run_callback_preflight(
                trainer, pl_module, batch, batch_idx, clip=self.options.get("clip"),
                on_alert=self.options.get("on_alert", "warn"), printer=_printer(trainer),
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Run one gradwatch step on the gradients the optimizer is about to apply."""
        monitor = self.monitor
        if monitor is None or monitor.closed:
            return
        self.last_report = monitor.step(
            global_step=int(trainer.global_step),
            loss=self._loss,
            optimizer=getattr(optimizer, "_optimizer", optimizer),
        )
        self._loss = None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        """Keep the ``training_step`` loss (a device tensor: no host read) for the coming step."""
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # With accumulation, the last micro-batch's (already divided) loss: scale it back.
            acc = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
            self._loss = loss.detach() * acc

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Emit pending alerts and close the sinks."""
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close the sinks so that what was recorded is flushed."""
        if self.monitor is not None:
            self.monitor.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The monitor's state (step, detectors, clipper, alerts) as plain containers and tensors."""
        if self.monitor is not None:
            return {"monitor": self.monitor.state_dict()}
        if self._pending_state is not None:
            return {"monitor": self._pending_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when fitting starts if the monitor does not exist yet."""
        state = state_dict.get("monitor")
        if state is None:
            return
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.load_state_dict(state)
        else:
            self._pending_state = state

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"GradWatchCallback({shown})"

