"""Remedy: 20-layer MLP: zero / too-small / too-large init vs He / Xavier.

All-zero weights make every unit identical and pass no gradient back; weights too small shrink
the signal at every layer, too large amplify it. He init (ReLU) and Xavier init (tanh) keep each
layer's output at the scale of its input.

Trains the pathology and the remedies with gradwatch attached (same data, same seed) and prints
what it found. Run alone: ``python examples/remedy_initialisation.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

from _remedy import compare  # examples/_remedy.py: the training loop shared by these examples

if __name__ == "__main__":
    compare("initialisation")
