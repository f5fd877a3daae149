"""The string contracts of gradwatch, defined once: alert kinds, severities and metric keys.

Every module that writes or reads a metric key or an alert kind imports it from here: the monitor
builds keys with :func:`metric_key`, the sinks, the report, the reference runner and the CLI take
them apart with :func:`split_key` and :func:`per_layer`. A record written today (JSONL, W&B,
TensorBoard) uses exactly these strings, so they are part of the public format: add, never rename.

Metric keys come in two shapes:

* per-layer keys ``"<family>/<layer>"``, e.g. ``"grad_norm/encoder.0"`` (:data:`LAYER_FAMILIES`);
* fixed keys, e.g. ``"grad_norm/total"``, ``"skipped_steps"``, ``"loss"`` (:data:`FIXED_KEYS`).

Example::

    from gradwatch import schema

    key = schema.metric_key(schema.GRAD_NORM, "encoder.0")   # "grad_norm/encoder.0"
    schema.split_key(key)                                     # ("grad_norm", "encoder.0")
    schema.split_key(schema.GRAD_NORM_TOTAL)                  # ("grad_norm/total", None)
    schema.per_layer({"grad_norm/a": 1.0, "grad_norm/total": 1.0}, schema.GRAD_NORM)  # {"a": 1.0}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar

# --- alert kinds -------------------------------------------------------------------------------
VANISHING = "vanishing"
EXPLODING = "exploding"
SPIKE = "spike"
NONFINITE = "nonfinite"
DEAD = "dead"
SATURATED = "saturated"
ACCUMULATING = "accumulating"
NO_GRADIENT = "no_gradient"
DESYNC = "desync"

AlertKind = Literal[
    "vanishing", "exploding", "spike", "nonfinite", "dead", "saturated", "accumulating", "no_gradient", "desync"
]
#: The built-in alert kinds. ``Alert.kind`` stays a ``str``: a custom detector may add its own.
ALERT_KINDS: tuple[str, ...] = (
    VANISHING, EXPLODING, SPIKE, NONFINITE, DEAD, SATURATED, ACCUMULATING, NO_GRADIENT, DESYNC,
)

# --- severities --------------------------------------------------------------------------------
INFO = "info"
WARNING = "warning"
ERROR = "error"
Severity = Literal["info", "warning", "error"]
#: Severities from the mildest to the most severe (their order is their rank).
SEVERITIES: tuple[str, ...] = (INFO, WARNING, ERROR)

# --- metric families: "<family>/<layer>" -------------------------------------------------------
GRAD_NORM = "grad_norm"
GRAD_MAX = "grad_max"
PARAM_NORM = "param_norm"
GRAD_TO_PARAM = "grad_to_param"
NONFINITE_COUNT = NONFINITE  # per-layer count of non-finite entries; the same string as the alert kind
TIME_GRAD_RATIO = "time_grad_ratio"
TIME_GRAD_DECAY = "time_grad_decay"
UPDATE_RATIO = "update_ratio"  # ||dw|| / ||w|| of the last logging step's optimizer update (gradwatch.evidence)
#: Families whose keys carry a layer (or, for the time families, a recurrent module) name.
LAYER_FAMILIES: tuple[str, ...] = (
    GRAD_NORM, GRAD_MAX, PARAM_NORM, GRAD_TO_PARAM, NONFINITE_COUNT, TIME_GRAD_RATIO, TIME_GRAD_DECAY, UPDATE_RATIO,
)

# --- fixed keys ---------------------------------------------------------------------------------
TOTAL = "total"  # the reserved "layer" name of the model-wide keys below
GRAD_NORM_TOTAL = "grad_norm/total"
NONFINITE_TOTAL = "nonfinite/total"
SKIPPED_STEPS = "skipped_steps"
CLIP_THRESHOLD = "clip/threshold"
CLIP_COEF = "clip/coef"
GRAD_NORM_CLIPPED_TOTAL = "grad_norm_clipped/total"
AMP_SCALE = "amp/scale"
AMP_OVERFLOW_STEPS = "amp/overflow_steps"
LOSS = "loss"
#: Model-wide keys: they name no layer, even those written ``"<family>/total"``.
FIXED_KEYS: tuple[str, ...] = (
    GRAD_NORM_TOTAL, NONFINITE_TOTAL, SKIPPED_STEPS, CLIP_THRESHOLD, CLIP_COEF, GRAD_NORM_CLIPPED_TOTAL,
    AMP_SCALE, AMP_OVERFLOW_STEPS, LOSS,
)
_FIXED = frozenset(FIXED_KEYS)

V = TypeVar("V")


def metric_key(family: str, layer: str) -> str:
    """The key of ``family``'s value for ``layer``: ``"<family>/<layer>"``.

    Args:
        family: one of :data:`LAYER_FAMILIES` (or a custom family without ``"/"``).
        layer: the qualified layer name (it may contain dots; it may not be ``"total"``).

    Raises:
        ValueError: if ``family`` is empty or contains ``"/"``, or ``layer`` is empty or ``"total"``
            (reserved for the model-wide keys).
    """
    if not family or "/" in family:
        raise ValueError(f"`family` must be a non-empty name without '/'; got {family!r}")
    if not layer or layer == TOTAL:
        raise ValueError(f"`layer` must be a non-empty layer name other than {TOTAL!r}; got {layer!r}")
    return f"{family}/{layer}"


def split_key(key: str) -> tuple[str, str | None]:
    """Take a metric key apart: ``(family, layer)`` for a per-layer key, ``(key, None)`` otherwise.

    A fixed key (:data:`FIXED_KEYS`, e.g. ``"grad_norm/total"``) and any key without ``"/"`` name no
    layer. Layer names may contain ``"/"`` themselves: only the first ``"/"`` separates.
    """
    if key in _FIXED or "/" not in key:
        return key, None
    family, layer = key.split("/", 1)
    return family, layer


def per_layer(metrics: Mapping[str, V], family: str) -> dict[str, V]:
    """The values of one per-layer ``family`` in ``metrics``, by layer name, in the metrics' order.

    Model-wide keys (``"grad_norm/total"``) are left out.
    """
    prefix = family + "/"
    n = len(prefix)
    return {k[n:]: v for k, v in metrics.items() if k.startswith(prefix) and k not in _FIXED}


__all__ = [
    "ACCUMULATING", "ALERT_KINDS", "AMP_OVERFLOW_STEPS", "AMP_SCALE", "AlertKind", "CLIP_COEF", "CLIP_THRESHOLD",
    "DEAD", "DESYNC", "ERROR", "EXPLODING", "FIXED_KEYS", "GRAD_MAX", "GRAD_NORM", "GRAD_NORM_CLIPPED_TOTAL",
    "GRAD_NORM_TOTAL", "GRAD_TO_PARAM", "INFO", "LAYER_FAMILIES", "LOSS", "NONFINITE", "NONFINITE_COUNT",
    "NONFINITE_TOTAL", "NO_GRADIENT", "PARAM_NORM", "SATURATED", "SEVERITIES", "SKIPPED_STEPS", "SPIKE",
    "Severity", "TIME_GRAD_DECAY", "TIME_GRAD_RATIO", "TOTAL", "UPDATE_RATIO", "VANISHING", "WARNING", "metric_key",
    "per_layer", "split_key",
]
