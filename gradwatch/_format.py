"""The one number formatter of gradwatch's human-readable text (console, messages, report, CLI)."""

from __future__ import annotations

import math

__all__ = ["fmt"]


def fmt(x: float | int | None) -> str:
    """A number as people read it: 3 significant digits, scientific notation far from 1.

    ``1e-3 <= |x| < 1e4`` prints with ``.3g`` (``0.0123``, ``1.5``, ``2.5e+03``); smaller or larger
    magnitudes with ``.2e`` (``1.00e-04``, ``3.20e+05``), so a threshold reads alike everywhere. Zero prints
    ``"0"``, integers (not floats) as they are, non-finite values as ``inf``/``-inf``/``nan`` and
    ``None`` as ``"-"``.

    Example::

        >>> [fmt(v) for v in (0.0, 1.5, 2500.0, 1e-4, float("inf"), 7, None)]
        ['0', '1.5', '2.5e+03', '1.00e-04', 'inf', '7', '-']
    """
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"
