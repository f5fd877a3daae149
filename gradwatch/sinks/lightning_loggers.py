"""A sink that forwards gradwatch's metrics to Lightning loggers (CSV, TensorBoard, W&B, MLflow, ...)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gradwatch.alerts import Alert
from gradwatch.distributed import is_rank_zero
from gradwatch.sinks._text import alert_markdown
from gradwatch.sinks.base import FailureGuard


def is_logger_of(logger: Any, class_name: str) -> bool:
    """Whether ``logger`` is an instance of a Lightning logger class named ``class_name``.

    Compares class names along the MRO so that ``lightning.pytorch`` and ``pytorch_lightning``
    loggers (two distinct class hierarchies) are both recognised without importing either.
    """
    return any(c.__name__ == class_name for c in type(logger).__mro__)


class LightningLoggers:
    """Send metrics to Lightning loggers with ``log_metrics(metrics, step=step)``.

    Inside :class:`gradwatch.lightning.GradWatchCallback` a ``LightningLoggers()`` built without
    loggers is bound to ``trainer.loggers`` when fitting starts (that is what ``sinks=None``
    uses). Alerts are written as text to loggers that have a text channel:
    ``TensorBoardLogger`` (``add_text``); W&B alerts are the :class:`~gradwatch.sinks.Wandb`
    sink's job. One failing logger is warned about once and the others keep receiving.

    Args:
        loggers: Lightning loggers (``lightning.pytorch.loggers.Logger`` or the
            ``pytorch_lightning`` equivalent), or ``None`` to bind to the Trainer's.
        save: call ``logger.save()`` after each record, as Lightning's own logging does.

    Raises:
        ValueError: a logger lacks ``log_metrics``.
    """

    def __init__(self, loggers: Iterable[Any] | None = None, save: bool = True) -> None:
        self.loggers: list[Any] | None = None
        if loggers is not None:
            self.bind(loggers)
        self.save = save
        self._guard = FailureGuard("", "loggers")

    def bind(self, loggers: Iterable[Any]) -> None:
        """Use these loggers from now on."""
        loggers = list(loggers)
        for lg in loggers:
            if not callable(getattr(lg, "log_metrics", None)):
                raise ValueError(
                    f"`loggers` must hold Lightning loggers (objects with log_metrics); got {type(lg).__name__}"
                )
        self.loggers = loggers

    def _safe(self, logger: Any, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        # A failing logger must not stop training or the other loggers.
        self._guard.call(logger, what, fn, *args, **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Forward one logging step's metrics to every logger (rank 0 only)."""
        if not self.loggers or not is_rank_zero():
            return
        for lg in self.loggers:
            self._safe(lg, "log_metrics", lg.log_metrics, dict(metrics), step=step)
            if self.save and callable(getattr(lg, "save", None)):
                self._safe(lg, "save", lg.save)

    def log_alert(self, alert: Alert) -> None:
        """Write the alert as text to loggers with a text channel (TensorBoard)."""
        if not self.loggers or not is_rank_zero():
            return
        for lg in self.loggers:
            if is_logger_of(lg, "TensorBoardLogger"):
                self._safe(
                    lg, "experiment.add_text", lambda lg=lg: lg.experiment.add_text(
                        "gradwatch/alerts", alert_markdown(alert), global_step=alert.step
                    )
                )

    def close(self) -> None:
        """Nothing to release: the Trainer finalizes its loggers."""
        return None

    def __repr__(self) -> str:
        names = "trainer.loggers" if self.loggers is None else ", ".join(type(lg).__name__ for lg in self.loggers)
        return f"LightningLoggers({names})"
