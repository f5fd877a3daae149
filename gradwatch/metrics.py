"""Metric naming: what a logging step reads back, and the metric keys it becomes.

:func:`register_metrics` adds the step's metric tensors to a :class:`~gradwatch.readout.Readout`
under names; :func:`decode_metrics` turns the host values back into the metrics dictionary with
the keys of :mod:`gradwatch.schema`. Both sides use the same names, so the order of the
transfer never matters.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from torch import Tensor

from gradwatch import schema
from gradwatch.readout import Readout, Values
from gradwatch.stats import GradStats


@dataclass
class StepTensors:
    """The device tensors a logging step reports, besides the detectors' readouts.

    Attributes:
        stats: a logging step's statistics (``param_norm`` every ``param_norm_every`` steps, ``grad_max``
            every ``grad_max_every`` steps).
        nonfinite_counts: non-finite entries per layer, when known on the device (skip/raise path).
        clip_threshold, clip_coef, clipped_norm: the clipper's figures, when clipping.
        amp: ``{"scale": ..., "overflow_steps": ...}`` from the AMP watch, when a scaler is known.
        time_log_ratio, time_log_decay, time_seen: the across-time profile of recurrent layers.
        loss: the step's training loss, when given.
        skipped_total: steps skipped so far (a device count when the skip is taken on the device).
    """

    stats: GradStats
    nonfinite_counts: Tensor | None = None
    clip_threshold: Tensor | None = None
    clip_coef: Tensor | None = None
    clipped_norm: Tensor | None = None
    amp: dict[str, Tensor] | None = None
    time_log_ratio: Tensor | None = None
    time_log_decay: Tensor | None = None
    time_seen: Tensor | None = None
    loss: Tensor | None = None
    skipped_total: Tensor | None = None


def register_metrics(out: Readout, t: StepTensors) -> None:
    """Add every tensor of ``t`` to ``out`` under its name (prefix ``"m/"``)."""
    s = t.stats
    assert s.full, "metrics are read on full (logging) steps"
    out.add("m/grad_norm", s.grad_norm)
    if s.param_norm is not None:  # every ``param_norm_every`` steps
        out.add("m/param_norm", s.param_norm)
    if s.grad_max is not None:  # every ``grad_max_every`` steps
        out.add("m/grad_max", s.grad_max)
    out.add("m/total", s.total_norm)
    optional = {
        "m/nonfinite": t.nonfinite_counts,
        "m/clip_threshold": t.clip_threshold,
        "m/clip_coef": t.clip_coef,
        "m/clipped_norm": t.clipped_norm,
        "m/time_log_ratio": t.time_log_ratio,
        "m/time_log_decay": t.time_log_decay,
        "m/time_seen": t.time_seen,
        "m/loss": t.loss,
        "m/skipped": t.skipped_total,
    }
    for name, tensor in optional.items():
        if tensor is not None:
            out.add(name, tensor)
    if t.amp is not None:
        out.add_all("m/amp/", t.amp)


@functools.lru_cache(maxsize=64)
def _layer_keys(family: str, layers: tuple[str, ...]) -> tuple[str, ...]:
    """``family``'s key for every layer (made once per model, not per logging step)."""
    return tuple(schema.metric_key(family, name) for name in layers)


def _ratio(g: float, p: float) -> float:
    if p > 0:
        return g / p
    return math.inf if g > 0 else 0.0


def decode_metrics(
    values: Values,
    layers: list[str],
    present: tuple[bool, ...],
    *,
    time_layers: list[str] = (),  # type: ignore[assignment]
    skipped_steps: int = 0,
    nonfinite_counts: list[float] | None = None,
) -> dict[str, float]:
    """The metrics dictionary of one logging step, keyed as :mod:`gradwatch.schema` says.

    Args:
        values: the read-back values of :func:`register_metrics` (among others).
        layers: layer names in forward order.
        present: which layers had a gradient this step.
        time_layers: recurrent modules with an across-time profile.
        skipped_steps: steps skipped so far on the host path (added to the device count in ``values``).
        nonfinite_counts: exact per-layer counts read on a rare path, when not in ``values``.
    """
    key = schema.metric_key
    names = tuple(layers)
    gn = values["m/grad_norm"]
    pn = values["m/param_norm"] if "m/param_norm" in values else None  # every ``param_norm_every`` steps
    gmax = values["m/grad_max"] if "m/grad_max" in values else None  # every ``grad_max_every`` steps
    m: dict[str, float] = {schema.GRAD_NORM_TOTAL: values.scalar("m/total")}
    norm_keys, max_keys = _layer_keys(schema.GRAD_NORM, names), _layer_keys(schema.GRAD_MAX, names)
    weight_keys, ratio_keys = _layer_keys(schema.PARAM_NORM, names), _layer_keys(schema.GRAD_TO_PARAM, names)
    if all(present):  # the common case: every layer, pairwise in C
        m.update(zip(norm_keys, gn))
        if gmax is not None:
            m.update(zip(max_keys, gmax))
        if pn is not None:
            m.update(zip(weight_keys, pn))
            m.update(zip(ratio_keys, map(_ratio, gn, pn)))
    else:
        for i in range(len(names)):
            if present[i]:
                m[norm_keys[i]] = gn[i]
                if gmax is not None:
                    m[max_keys[i]] = gmax[i]
                if pn is not None:
                    m[weight_keys[i]] = pn[i]
                    m[ratio_keys[i]] = _ratio(gn[i], pn[i])
    counts = values["m/nonfinite"] if "m/nonfinite" in values else nonfinite_counts
    m[schema.NONFINITE_TOTAL] = float(sum(counts)) if counts is not None else 0.0
    if counts is not None:
        for i, name in enumerate(layers):
            if counts[i] > 0:
                m[key(schema.NONFINITE_COUNT, name)] = counts[i]
    m[schema.SKIPPED_STEPS] = float(skipped_steps) + (values.scalar("m/skipped") if "m/skipped" in values else 0.0)
    if "m/clip_threshold" in values:
        m[schema.CLIP_THRESHOLD] = values.scalar("m/clip_threshold")
        m[schema.CLIP_COEF] = values.scalar("m/clip_coef")
        m[schema.GRAD_NORM_CLIPPED_TOTAL] = values.scalar("m/clipped_norm")
    if "m/amp/scale" in values:
        m[schema.AMP_SCALE] = values.scalar("m/amp/scale")
        m[schema.AMP_OVERFLOW_STEPS] = values.scalar("m/amp/overflow_steps")
    if "m/time_seen" in values:
        ratio, decay, seen = values["m/time_log_ratio"], values["m/time_log_decay"], values["m/time_seen"]
        for j, name in enumerate(time_layers):
            if seen[j] > 0:
                m[key(schema.TIME_GRAD_RATIO, name)] = math.exp(ratio[j])
                m[key(schema.TIME_GRAD_DECAY, name)] = math.exp(decay[j])
    if "m/loss" in values:
        m[schema.LOSS] = values.scalar("m/loss")
    return m
