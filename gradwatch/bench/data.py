"""Data sets generated in code from a seed: nothing is downloaded, every run sees the same batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Sampler", "blobs", "circles", "copy_first_token", "images", "key_retrieval", "markov_tokens", "teacher_classes",
    "teacher_regression",
]


@dataclass
class Sampler:
    """Random mini-batches drawn from a fixed data set, the same ones for the same seed.

    Attributes:
        x: inputs (first dimension: samples).
        y: targets.
        batch: samples per mini-batch.
        seed: seed of the draw.
    """

    x: Tensor
    y: Tensor
    batch: int
    seed: int = 0

    def __call__(self, i: int) -> tuple[Tensor, Tensor]:
        """The ``i``-th mini-batch."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        idx = torch.randint(0, self.x.shape[0], (self.batch,), generator=g)
        return self.x[idx], self.y[idx]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def circles(n: int = 1000, noise: float = 0.1, factor: float = 0.8, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Two concentric circles (the AUTOTRAINER ``simplednn`` circle set, as ``make_circles`` draws it).

    Points on the unit circle (class 0) and on a circle of radius ``factor`` (class 1), Gaussian noise
    of std ``noise``, then scaled to ``[-1, 1]`` per feature.
    """
    g = _gen(seed)
    n_out = n // 2
    n_in = n - n_out
    t_out = torch.linspace(0, 2 * math.pi, n_out + 1)[:-1]
    t_in = torch.linspace(0, 2 * math.pi, n_in + 1)[:-1]
    x = torch.cat([torch.stack([t_out.cos(), t_out.sin()], 1), factor * torch.stack([t_in.cos(), t_in.sin()], 1)])
    y = torch.cat([torch.zeros(n_out, dtype=torch.long), torch.ones(n_in, dtype=torch.long)])
    x = x + noise * torch.randn(x.shape, generator=g)
    perm = torch.randperm(n, generator=g)
    x, y = x[perm], y[perm]
    lo, hi = x.min(0).values, x.max(0).values
    return 2 * (x - lo) / (hi - lo) - 1, y


def blobs(n: int = 1000, centers: int = 3, dim: int = 2, std: float = 2.0, seed: int = 2) -> tuple[Tensor, Tensor]:
    """Gaussian blobs around ``centers`` random centres in ``[-10, 10]^dim`` (``make_blobs``)."""
    g = _gen(seed)
    c = torch.rand(centers, dim, generator=g) * 20 - 10
    y = torch.randint(0, centers, (n,), generator=g)
    return c[y] + std * torch.randn(n, dim, generator=g), y


def teacher_classes(n: int = 2048, dim: int = 20, classes: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Standard-normal inputs labelled by a random two-layer tanh teacher (argmax): learnable, not linear."""
    g = _gen(seed)
    w1 = torch.randn(dim, 32, generator=g) / math.sqrt(dim)
    w2 = torch.randn(32, classes, generator=g)
    x = torch.randn(n, dim, generator=g)
    return x, (torch.tanh(2 * x @ w1) @ w2).argmax(1)


def teacher_regression(n: int = 2048, dim: int = 32, out: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Standard-normal inputs, targets from a random tanh teacher scaled to unit variance."""
    g = _gen(seed)
    w1 = torch.randn(dim, 64, generator=g) / math.sqrt(dim)
    w2 = torch.randn(64, out, generator=g)
    x = torch.randn(n, dim, generator=g)
    y = torch.tanh(x @ w1) @ w2
    return x, y / y.std(0, keepdim=True)


def images(n: int = 1024, size: int = 16, classes: int = 4, channels: int = 1, seed: int = 0,
           noise: float = 0.25) -> tuple[Tensor, Tensor]:
    """Pixel images in ``[0, 1]``: one smooth random template per class plus Gaussian ``noise`` (like digits)."""
    g = _gen(seed)
    coarse = torch.rand(classes, channels, size // 4, size // 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + noise * torch.randn(n, channels, size, size, generator=g)
    return x.clamp(0, 1), y


def markov_tokens(n: int = 512, length: int = 32, vocab: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token sequences from a random sparse Markov chain (4 likely successors per token).

    Returns ``(inputs, targets)``, the targets being the inputs shifted by one (next-token prediction).
    """
    g = _gen(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    seq = torch.empty(n, length + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(length):
        pick = torch.randint(0, 4, (n,), generator=g)
        seq[:, t + 1] = succ[seq[:, t], pick]
    return seq[:, :-1], seq[:, 1:]


def copy_first_token(n: int = 1024, length: int = 100, vocab: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """One-hot sequences whose class is their first token, followed by ``length - 1`` blank steps."""
    g = _gen(seed)
    tok = torch.randint(0, vocab, (n,), generator=g)
    x = torch.zeros(n, length, vocab)
    x[:, 0] = torch.nn.functional.one_hot(tok, vocab).float()
    return x, tok


def key_retrieval(
    n: int = 2048, length: int = 16, dim: int = 32, classes: int = 4, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Retrieve the class stored at the position whose key the query (position 0) repeats.

    Each position carries a fixed random key in features ``[0, 8)``; position 0 repeats (x3) the key of a random
    position ``q``, which stores the class one-hot (x3) in features ``[8, 8 + classes)``. An attention head
    that learns to look at ``q`` solves it: its attention becomes sharp because the task asks for it.
    """
    g = _gen(seed)
    x = 0.1 * torch.randn(n, length, dim, generator=g)
    keys = torch.randn(length, 8, generator=g)
    x[:, :, :8] = keys
    q = torch.randint(1, length, (n,), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x[:, 0, :8] = 3 * keys[q]
    x[torch.arange(n), q, 8 : 8 + classes] = 3 * torch.nn.functional.one_hot(y, classes).float()
    return x, y
