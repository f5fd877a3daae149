"""gradwatch: watch the gradients of any PyTorch model while it trains.

Per-layer statistics on the device, calibrated alerts (vanishing, exploding, spike, non-finite,
dead, saturated) with remedies that fit the model, clipping and skipping of poisoned steps, and
sinks for the console, JSONL, Weights & Biases, TensorBoard and Lightning loggers.
"""

import logging as _logging

from gradwatch import clip, schema, sinks
from gradwatch.alerts import Alert
from gradwatch.detectors import (
    Accumulating,
    ActivationStats,
    AttentionSaturation,
    Dead,
    Detector,
    DetectorContext,
    DeviceState,
    Exploding,
    Finding,
    GradStats,
    Latch,
    LossDivergence,
    NoGradient,
    NonFinite,
    Oscillation,
    Persistence,
    Saturated,
    SmallUpdates,
    Spike,
    StepEvidence,
    TimeVanishing,
    Vanishing,
    default_detectors,
)
from gradwatch.errors import GradWatchAlertError, GradWatchWarning, NonFiniteGradientError
from gradwatch.monitor import GradWatch, StepReport, watch
from gradwatch.preflight import preflight
from gradwatch.preflight_report import LayerRow, PreflightReport

__version__ = "0.1.0"

# The logging HOWTO's rule for libraries: records reach the handlers the user configured, and
# Python's last-resort handler never prints them (the Console sink is the terminal channel).
_logging.getLogger("gradwatch").addHandler(_logging.NullHandler())

__all__ = [
    "Accumulating",
    "ActivationStats",
    "Alert",
    "AttentionSaturation",
    "Dead",
    "Detector",
    "DetectorContext",
    "DeviceState",
    "Exploding",
    "Finding",
    "GradStats",
    "Latch",
    "LossDivergence",
    "NoGradient",
    "Oscillation",
    "SmallUpdates",
    "LayerRow",
    "Persistence",
    "PreflightReport",
    "StepEvidence",
    "default_detectors",
    "schema",
    "GradWatch",
    "GradWatchAlertError",
    "GradWatchWarning",
    "NonFinite",
    "NonFiniteGradientError",
    "Saturated",
    "Spike",
    "StepReport",
    "TimeVanishing",
    "Vanishing",
    "__version__",
    "clip",
    "sinks",
    "preflight",
    "watch",
]
