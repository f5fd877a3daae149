"""Remedy: 32-layer tanh stack: plain vs residual.

In a plain stack the gradient reaching layer 1 is a product of 32 Jacobians, each shrinking it
(tanh, default init). A skip connection x + f(x) adds an identity path: the gradient reaches
every layer undiminished.

Trains the pathology and the remedy with gradwatch attached (same data, same seed) and prints
what it found. Run alone: ``python examples/remedy_residual.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

from _remedy import compare  # examples/_remedy.py: the training loop shared by these examples

if __name__ == "__main__":
    compare("residual")
