"""Option checking, apart from construction: shared by ``GradWatch`` and the framework callbacks.

``MonitorOptions.check(**options)`` validates every keyword option of :class:`~gradwatch.GradWatch`
with one message format and returns them as one named thing; the monitor is then built from it.
The Lightning and Hugging Face callbacks validate their options the same way in their
``__init__``, without building a throwaway monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from gradwatch._checks import check_choice, check_int
from gradwatch.alerts import Alert
from gradwatch.sinks.base import Sink

ON_NONFINITE = ("skip", "warn", "raise", "ignore")
ON_ALERT = ("warn", "raise", "ignore")
GRANULARITIES = ("module", "parameter")


def _check_bool(name: str, value: Any, *, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    allowed = "True, False or None" if allow_none else "True or False"
    raise ValueError(f"`{name}` must be {allowed}; got {value!r}")


def check_sinks(sinks: Any) -> list[Sink] | None:
    """``None``, one sink or a list of sinks, as a list (or ``None``).

    Raises:
        ValueError: anything else, naming what was given.
    """
    if sinks is None:
        return None
    if isinstance(sinks, Sink):
        return [sinks]
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, (list, tuple)) or not all(
        isinstance(s, Sink) for s in sinks
    ):
        raise ValueError(
            "`sinks` must be None, a sink or a list of sinks (objects with log_metrics, log_alert and close), "
            f"e.g. [gw.sinks.JSONL('grads.jsonl')]; got {sinks!r}"
        )
    return list(sinks)


def _check_detectors(detectors: Any) -> None:
    if detectors == "default" or detectors is None:
        return
    from gradwatch.detectors import Detector

    if isinstance(detectors, str) or not isinstance(detectors, (list, tuple)) or not all(
        isinstance(d, Detector) for d in detectors
    ):
        raise ValueError(f"`detectors` must be 'default', None or a list of Detector objects; got {detectors!r}")


def _check_clip(clip: Any) -> None:
    from gradwatch.clip import Clipper

    if clip is not None and not isinstance(clip, Clipper):
        raise ValueError(f"`clip` must be None or a clipping strategy such as gw.clip.Norm(1.0); got {clip!r}")


@dataclass(frozen=True)
class MonitorOptions:
    """Every keyword option of :class:`~gradwatch.GradWatch`, checked (see its docstring)."""

    detectors: str | Sequence[Any] | None = "default"
    clip: Any = None
    on_nonfinite: str = "skip"
    on_alert: str | Callable[[Alert], Any] = "warn"
    sinks: list[Sink] | None = None
    log_every: int = 10
    grad_max_every: int = 100
    param_norm_every: int = 10
    granularity: str = "module"
    track_activations: bool = False
    track_time: bool | None = None
    scaler: Any = None
    history_size: int = 1000
    max_alerts: int = 1000
    remind_every: int = 500

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in signature order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def check(cls, **options: Any) -> MonitorOptions:
        """Validate ``options``; return them with ``sinks`` as a list.

        Raises:
            TypeError: an unknown keyword.
            ValueError: a value outside its allowed set, naming the argument and the allowed values.
        """
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"GradWatch got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(cls.names())}"
            )
        o = cls(**options)
        check_choice("on_nonfinite", o.on_nonfinite, ON_NONFINITE)
        if not callable(o.on_alert):
            check_choice("on_alert", o.on_alert, ON_ALERT)
        check_choice("granularity", o.granularity, GRANULARITIES)
        check_int("log_every", o.log_every, 1)
        check_int("grad_max_every", o.grad_max_every, 1)
        check_int("param_norm_every", o.param_norm_every, 1)
        check_int("history_size", o.history_size, 1)
        check_int("max_alerts", o.max_alerts, 1)
        check_int("remind_every", o.remind_every, 1)
        _check_bool("track_activations", o.track_activations)
        _check_bool("track_time", o.track_time, allow_none=True)
        _check_clip(o.clip)
        from gradwatch.amp import check_scaler

        check_scaler(o.scaler)
        _check_detectors(o.detectors)
        sinks = check_sinks(o.sinks)
        return cls(**{**{f.name: getattr(o, f.name) for f in fields(cls)}, "sinks": sinks})


# The callbacks take GradWatch's keyword options, except the scaler, which comes from the Trainer.
CALLBACK_OPTIONS = [n for n in MonitorOptions.names() if n != "scaler"]


def check_callback_options(
    owner: str, options: Mapping[str, Any], scaler_source: str, extra: Sequence[str] = ()
) -> list[Sink] | None:
    """Validate a callback's options with GradWatch's own messages; return its sinks as a list.

    Args:
        owner: the callback's class name, for the messages.
        options: the keyword options given to the callback.
        scaler_source: where the callback takes the AMP scaler from (``scaler`` is refused).
        extra: options of the callback itself (not passed to the monitor).

    Raises:
        TypeError: ``scaler`` or an unknown keyword.
        ValueError: an option value outside its allowed set.
    """
    if "scaler" in options:
        raise TypeError(f"{owner} takes the AMP scaler from {scaler_source}; do not pass `scaler`")
    allowed = [*CALLBACK_OPTIONS, *extra]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"{owner} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    monitor_options = {k: v for k, v in options.items() if k not in extra}
    return MonitorOptions.check(**monitor_options).sinks
