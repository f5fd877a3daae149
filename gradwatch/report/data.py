"""Read a gradwatch JSONL run into arrays the report can plot (no matplotlib here)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch import schema
from gradwatch.sinks.jsonl import read_jsonl


@dataclass
class Run:
    """One JSONL run, parsed.

    Attributes:
        path: the file.
        name: display name (``scenario / variant`` for demo runs, else the file's stem).
        layers: layer names in forward order (from the ``meta`` record, else first appearance).
        steps: logging steps, ascending.
        metrics: per logging step, the metrics record (same order as ``steps``).
        alerts: the ``alert`` records.
        meta: the ``meta`` record (empty if absent).
        summary: the demo's ``summary`` record (empty if absent).
    """

    path: Path
    name: str
    layers: list[str]
    steps: list[int]
    metrics: list[dict[str, float]]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one metric key, where present."""
        xs, ys = [], []
        for s, m in zip(self.steps, self.metrics):
            if key in m:
                xs.append(s)
                ys.append(float(m[key]))
        return xs, ys

    def family(self, family: str) -> list[str]:
        """Layer names that have ``<family>/<layer>`` keys (:mod:`gradwatch.schema`), in forward order."""
        keys = {layer for m in self.metrics for layer in schema.per_layer(m, family)}
        return [x for x in self.layers if x in keys] + sorted(keys - set(self.layers))

    def nonfinite(self, layer: str) -> list[bool]:
        """Per logging step: whether ``layer``'s gradient held Inf/NaN (its norm is not finite, or
        it counted non-finite entries)."""
        norm, count = schema.metric_key(schema.GRAD_NORM, layer), schema.metric_key(schema.NONFINITE_COUNT, layer)
        return [
            (norm in m and not math.isfinite(m[norm])) or m.get(count, 0.0) > 0 for m in self.metrics
        ]

    @property
    def group(self) -> str:
        """The scenario of a demo run (runs of one scenario are shown side by side)."""
        return str(self.summary.get("scenario") or "runs")

    @property
    def role(self) -> str:
        """``"pathology"``, ``"remedy"`` or ``""``."""
        return str(self.summary.get("role") or "")


def load_run(path: str | os.PathLike[str]) -> Run:
    """Parse a gradwatch JSONL file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a gradwatch JSONL run (no ``metrics`` record, or a line that is not
            JSON other than one cut by a crash, see :func:`~gradwatch.sinks.read_jsonl`).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"run file {str(p)!r} does not exist")
    records = read_jsonl(p)  # its ValueError names the file and the line
    meta: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    by_step: dict[int, dict[str, float]] = {}
    alerts: list[dict[str, Any]] = []
    for r in records:
        kind = r.get("type") if isinstance(r, dict) else None
        if kind == "meta":
            meta = r
        elif kind == "metrics":
            by_step.setdefault(int(r["step"]), {}).update(
                {k: float(v) for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))}
            )
        elif kind == "alert":
            alerts.append(r)
        elif kind == "summary":
            summary = r
    if not by_step:
        raise ValueError(f"{str(p)!r} is not a gradwatch JSONL run: it has no 'metrics' record")
    steps = sorted(by_step)
    metrics = [by_step[s] for s in steps]
    layers = list(meta.get("layers") or [])
    if not layers:
        seen: dict[str, None] = {}
        for m in metrics:
            seen.update(dict.fromkeys(schema.per_layer(m, schema.GRAD_NORM)))
        layers = list(seen)
    if summary:
        name = f"{summary.get('scenario', '?')} / {summary.get('variant', '?')}"
    else:
        name = p.stem
    return Run(p, name, layers, steps, metrics, alerts, meta, summary)


def log10(x: float) -> float:
    """log10 for plotting: ``nan`` for non-positive or non-finite values."""
    return math.log10(x) if x > 0 and math.isfinite(x) else math.nan
