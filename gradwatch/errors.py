"""Exceptions and warnings raised by gradwatch."""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.alerts import Alert


class GradWatchWarning(UserWarning):
    """Warning category for every gradwatch alert and notice.

    Filter it like any warning, e.g. ``warnings.simplefilter("ignore", GradWatchWarning)``.
    """


# Frames in these packages are not "the user's code": a warning points past them.
_LIBRARIES = ("gradwatch", "torch", "lightning", "pytorch_lightning", "transformers", "accelerate")


def _library_dirs() -> tuple[str, ...]:
    dirs = []
    for name in _LIBRARIES:
        mod = sys.modules.get(name)
        for path in getattr(mod, "__path__", None) or ():
            dirs.append(os.path.join(os.path.abspath(path), ""))
    return tuple(dirs)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a warning raised by this function's caller to point at the user's code.

    Counts the caller's frames until the first one outside gradwatch, torch, Lightning, Hugging Face
    ``transformers`` and ``accelerate`` (Python 3.11 has no ``skip_file_prefixes``). When every frame
    is inside them, the level runs past the stack and the warning points at none (``sys:1``).
    """
    skip = _library_dirs()
    frame = sys._getframe(2)  # the caller's caller: the first candidate
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame = frame.f_back
        level += 1
    return level


def warn_user(message: str) -> None:
    """Warn with a :class:`GradWatchWarning` that points at the user's line, not at gradwatch's."""
    warnings.warn(message, GradWatchWarning, stacklevel=user_stacklevel())


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
