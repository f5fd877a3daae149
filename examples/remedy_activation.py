"""Remedy: 20-layer MLP: sigmoid vs ReLU / LeakyReLU.

Sigmoid's derivative is at most 1/4, so the gradient shrinks by at least 4x per layer on its way
back through 20 layers. ReLU and LeakyReLU pass it unchanged where active (with He init).

Trains the pathology and the remedies with gradwatch attached (same data, same seed) and prints
what it found. Run alone: ``python examples/remedy_activation.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

from _remedy import compare  # examples/_remedy.py: the training loop shared by these examples

if __name__ == "__main__":
    compare("activation")
