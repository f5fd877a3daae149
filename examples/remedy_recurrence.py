"""Remedy: copy the first token across 50 steps: vanilla RNN vs LSTM.

A vanilla RNN multiplies the gradient by the same recurrent Jacobian at every time step, so it
decays geometrically toward the sequence's start (~1e-10 over 50 steps at init) and the first
token cannot be learned. The LSTM's memory cell carries it through the forget gate: with its
bias at 3, sigmoid(3)^50 = 8% of the memory survives 50 steps at init (with bias 1, 0.73^50 =
2e-7).

Trains the pathology and the remedy with gradwatch attached (same data, same seed) and prints
what it found. Run alone: ``python examples/remedy_recurrence.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

from _remedy import compare  # examples/_remedy.py: the training loop shared by these examples

if __name__ == "__main__":
    compare("recurrence")
