"""Remedy: 20-layer sigmoid MLP: without vs with BatchNorm.

Without normalisation the pre-activations of a deep sigmoid stack drift away from 0, where
sigmoid is flattest, and the gradient shrinks at every layer. BatchNorm re-centres and re-scales
each layer's input so the gradient keeps its scale.

Trains the pathology and the remedy with gradwatch attached (same data, same seed) and prints
what it found. Run alone: ``python examples/remedy_normalisation.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

from _remedy import compare  # examples/_remedy.py: the training loop shared by these examples

if __name__ == "__main__":
    compare("normalisation")
