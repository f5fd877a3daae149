"""Option checking shared by the framework callbacks (Lightning, Hugging Face)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from gradwatch.monitor import GradWatch
from gradwatch.sinks.base import Sink

# The callbacks take GradWatch's keyword options, except the scaler, which comes from the Trainer.
CALLBACK_OPTIONS = [
    p for p in inspect.signature(GradWatch.__init__).parameters if p not in ("self", "model", "scaler")
]


def check_callback_options(owner: str, options: Mapping[str, Any], scaler_source: str) -> list[Sink] | None:
    """Validate a callback's options with GradWatch's own messages; return its sinks as a list.

    Args:
        owner: the callback's class name, for the messages.
        options: the keyword options given to the callback.
        scaler_source: where the callback takes the AMP scaler from (``scaler`` is refused).

    Raises:
        TypeError: ``scaler`` or an unknown keyword.
        ValueError: an option value outside its allowed set.
    """
    if "scaler" in options:
        raise TypeError(f"{owner} takes the AMP scaler from {scaler_source}; do not pass `scaler`")
    unknown = sorted(set(options) - set(CALLBACK_OPTIONS))
    if unknown:
        raise TypeError(
            f"{owner} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(CALLBACK_OPTIONS)}"
        )
    sinks = options.get("sinks")
    sinks = None if sinks is None else list(sinks)
    # Check every value now on a throwaway one-layer model (not closed: closing it would close
    # the user's sinks).
    GradWatch(nn.Linear(1, 1), **{**options, "sinks": sinks})
    return sinks
