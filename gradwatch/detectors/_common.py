"""Helpers shared by the built-in detectors (not part of the framework's public surface)."""

from __future__ import annotations

from gradwatch._checks import check_int
from gradwatch.detectors.base import Detector, DetectorContext, Fired, Persistence

__all__ = ["PersistentChecks", "fmt"]


def fmt(x: float) -> str:
    """A figure in a message: 3 significant digits, scientific notation far from 1."""
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


class PersistentChecks(Detector):
    """Several conditions, each per layer or model-wide, each with a :class:`Persistence`.

    Subclasses list ``sources`` as ``(name, per_layer)`` and call :meth:`fired_by_source` in
    ``collect``.
    """

    sources: tuple[tuple[str, bool], ...] = ()

    def __init__(self, persist: int) -> None:
        super().__init__()
        self.persist = check_int("persist", persist, 1)
        self.checks: dict[str, Persistence] = {}

    def bind(self, ctx: DetectorContext) -> None:
        super().bind(ctx)
        n = len(ctx.layers)
        self.checks = {
            name: Persistence(self.state, name, n if per_layer else 1, self.persist) for name, per_layer in self.sources
        }

    def fired_by_source(self, values: dict[str, list[float]]) -> dict[str, list[Fired]]:
        """The fired entries of each check (and free the latches)."""
        return {name: check.fired(values) for name, check in self.checks.items()}
