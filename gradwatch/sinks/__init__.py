"""Sinks: where gradwatch sends metrics and alerts.

``Console`` and ``JSONL`` need nothing but the standard library; ``Wandb`` and ``TensorBoard``
import their packages only when constructed.
"""

from __future__ import annotations

from typing import Any

from gradwatch.sinks.base import Sink, SinkSet
from gradwatch.sinks.console import Console
from gradwatch.sinks.jsonl import JSONL, read_jsonl
from gradwatch.sinks.lightning_loggers import LightningLoggers

__all__ = ["JSONL", "Console", "LightningLoggers", "Sink", "SinkSet", "TensorBoard", "Wandb", "read_jsonl"]


def __getattr__(name: str) -> Any:
    if name == "Wandb":
        from gradwatch.sinks.wandb import Wandb

        return Wandb
    if name == "TensorBoard":
        from gradwatch.sinks.tensorboard import TensorBoard

        return TensorBoard
    raise AttributeError(f"module 'gradwatch.sinks' has no attribute {name!r}")
