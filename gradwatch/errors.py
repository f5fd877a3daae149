"""Exceptions and warnings raised by gradwatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.alerts import Alert


class GradWatchWarning(UserWarning):
    """Warning category for every gradwatch alert and notice.

    Filter it like any warning, e.g. ``warnings.simplefilter("ignore", GradWatchWarning)``.
    """


class GradWatchAlertError(RuntimeError):
    """Raised by ``on_alert="raise"`` when a detector fires.

    Attributes:
        alert: the :class:`~gradwatch.Alert` that was raised.
    """

    def __init__(self, alert: Alert) -> None:
        super().__init__(alert.message)
        self.alert = alert


class NonFiniteGradientError(RuntimeError):
    """Raised by ``on_nonfinite="raise"`` when a gradient holds NaN or Inf.

    Attributes:
        step: the optimizer step (counted from 0).
        layers: the layers holding non-finite values, in backward order (where they first appear).
    """

    def __init__(self, step: int, layers: list[str]) -> None:
        shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
        super().__init__(
            f"Non-finite gradients at step {step} in {len(layers)} layer(s): {shown}. "
            "To skip such steps instead of raising, set `on_nonfinite='skip'`."
        )
        self.step = step
        self.layers = list(layers)
