"""Tasks of the reference scenarios: data generated in code from a seed, nothing downloaded.

A task is a callable ``batch(step) -> (inputs, targets)`` plus a loss; each is deterministic
given its seed, so a scenario's pathology and remedy see exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

Batch = tuple[Tensor, Tensor]


@dataclass
class Task:
    """A data stream and its loss.

    Attributes:
        name: short description (shown in the demo and the report).
        batch: ``batch(step)`` returns ``(inputs, targets)`` for that step.
        loss: ``loss(outputs, targets)`` returns a scalar tensor.
        chance_loss: the loss of the best constant prediction (what "did not learn" means).
    """

    name: str
    batch: Callable[[int], Batch]
    loss: Callable[[Tensor, Tensor], Tensor]
    chance_loss: float


def teacher_regression(in_dim: int = 32, out_dim: int = 8, batch: int = 64, seed: int = 0) -> Task:
    """Regression on the outputs of a fixed random two-layer tanh teacher (targets of unit scale).

    Args:
        in_dim: input features (standard normal).
        out_dim: target dimensions.
        batch: samples per step.
        seed: seed of the teacher and of the inputs.
    """
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(in_dim, 64, generator=g) / in_dim**0.5
    w2 = torch.randn(64, out_dim, generator=g) / 8.0
    # Scale the teacher so that its outputs have unit variance: the chance loss is then ~1.
    probe = torch.tanh(torch.randn(4096, in_dim, generator=g) @ w1) @ w2
    w2 = w2 / probe.std(0, keepdim=True)

    def make(step: int) -> Batch:
        gs = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
        x = torch.randn(batch, in_dim, generator=gs)
        return x, torch.tanh(x @ w1) @ w2

    return Task(f"teacher regression ({in_dim}->{out_dim})", make, F.mse_loss, 1.0)


def copy_first_token(length: int = 50, vocab: int = 8, batch: int = 64, seed: int = 0) -> Task:
    """Remember the first token of a sequence across ``length - 1`` blank steps.

    Inputs are one-hot ``(batch, length, vocab)`` floats: a random token at step 0, zeros after;
    the target is that token's class, read at the last step. Chance is ``log(vocab)``.

    Args:
        length: sequence length (time steps the memory must span).
        vocab: number of token classes.
        batch: sequences per step.
        seed: seed of the tokens.
    """

    def make(step: int) -> Batch:
        gs = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
        tok = torch.randint(0, vocab, (batch,), generator=gs)
        x = torch.zeros(batch, length, vocab)
        x[:, 0] = F.one_hot(tok, vocab).float()
        return x, tok

    chance = float(torch.log(torch.tensor(float(vocab))))
    return Task(f"copy the first token across {length} steps", make, F.cross_entropy, chance)

