"""Remedy: learning rate past the stability limit: SGD without vs with clipping.

With a learning rate past the stability limit every update overshoots, the error grows and with
it the next gradient; through 5 ReLU layers the growth compounds, from 0.5x the weights' norm to
Inf within a few steps. Clipping bounds each update, so the same learning rate trains.

Trains the pathology and the remedies with gradwatch attached (same data, same seed) and prints
what it found. Run alone: ``python examples/remedy_clipping.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

from _remedy import compare  # examples/_remedy.py: the training loop shared by these examples

if __name__ == "__main__":
    compare("clipping")
