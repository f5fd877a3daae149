"""Detectors: device-side checks of each step's evidence, read back at logging steps.

The framework lives in :mod:`gradwatch.detectors.base`; each family of built-in checks in its own
module: :mod:`~gradwatch.detectors.depth` (vanishing, exploding), :mod:`~gradwatch.detectors.spike`,
:mod:`~gradwatch.detectors.nonfinite`, :mod:`~gradwatch.detectors.activations` (dead, saturated)
and :mod:`~gradwatch.detectors.time` (vanishing across time). The GradScaler's overflow watch,
which is not a detector the user chooses, lives in :mod:`gradwatch.amp`.
"""

from __future__ import annotations

from gradwatch.detectors.accumulating import Accumulating
from gradwatch.detectors.activations import Dead, Saturated
from gradwatch.detectors.attention import AttentionSaturation
from gradwatch.detectors.base import (
    ActivationStats,
    Detector,
    DetectorContext,
    DeviceState,
    Finding,
    Fired,
    GradStats,
    Latch,
    Persistence,
    StepEvidence,
)
from gradwatch.detectors.depth import Exploding, Vanishing
from gradwatch.detectors.loss import LossDivergence
from gradwatch.detectors.no_gradient import NoGradient
from gradwatch.detectors.nonfinite import NonFinite
from gradwatch.detectors.oscillation import Oscillation
from gradwatch.detectors.spike import Spike
from gradwatch.detectors.time import TimeVanishing
from gradwatch.detectors.updates import SmallUpdates

__all__ = [
    "Accumulating",
    "ActivationStats",
    "AttentionSaturation",
    "Dead",
    "Detector",
    "DetectorContext",
    "DeviceState",
    "Exploding",
    "Finding",
    "Fired",
    "GradStats",
    "Latch",
    "LossDivergence",
    "NoGradient",
    "NonFinite",
    "Oscillation",
    "Persistence",
    "Saturated",
    "SmallUpdates",
    "Spike",
    "StepEvidence",
    "TimeVanishing",
    "Vanishing",
    "default_detectors",
]


def default_detectors() -> list[Detector]:
    """The built-in detectors with their calibrated defaults."""
    return [
        NonFinite(), Spike(), Vanishing(), Exploding(), Dead(), Saturated(), TimeVanishing(),
        NoGradient(), Accumulating(), LossDivergence(), SmallUpdates(), AttentionSaturation(),
        Oscillation(),
    ]
