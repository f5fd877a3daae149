"""Argument validation shared by the public constructors (one message format everywhere)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming the argument, the bad value and the allowed values."""
    allowed = tuple(allowed)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {shown}; got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> int:
    """Raise unless ``value`` is an int (not bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Raise unless ``value`` is a finite real number > 0 (or >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = v == v and v not in (float("inf"), float("-inf")) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}; got {value!r}")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float) -> float:
    """Raise unless ``low < value < high`` (open interval)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low < float(value) < high
    if not ok:
        raise ValueError(f"`{name}` must be a number strictly between {low} and {high}; got {value!r}")
    return float(value)
