"""Reference models: small, CPU-friendly, each pathology beside its remedy."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU}
INITS = ("default", "he", "xavier", "zero")


def init_weights_(model: nn.Module, scheme: str, scale: float = 1.0, nonlinearity: str = "relu") -> nn.Module:
    """Initialise every ``nn.Linear`` of ``model`` in place and return it.

    Args:
        model: the model.
        scheme: ``"default"`` (PyTorch's, only scaled), ``"he"`` (Kaiming normal), ``"xavier"``
            (Xavier uniform with the gain of ``nonlinearity``) or ``"zero"`` (all weights 0).
        scale: factor applied to the weights afterwards (too-small / too-large init).
        nonlinearity: ``"relu"``, ``"leaky_relu"``, ``"tanh"`` or ``"sigmoid"``.
    """
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.Linear):
                continue
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity=nonlinearity)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(nonlinearity))
            elif scheme == "zero":
                nn.init.zeros_(m.weight)
            if scheme in ("he", "xavier") and m.bias is not None:
                nn.init.zeros_(m.bias)
            m.weight.mul_(scale)
    return model


def mlp(
    depth: int,
    width: int = 64,
    in_dim: int = 32,
    out_dim: int = 8,
    activation: str = "relu",
    batchnorm: bool = False,
) -> nn.Sequential:
    """A plain stack: ``depth`` hidden ``Linear`` layers (+ ``BatchNorm1d``) + activation, then a head.

    Children are numbered in forward order, so layer names read ``0``, ``2``, ... and the head last.
    """
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers.append(nn.Linear(d, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``x + f(x)`` with ``f`` = activation after ``Linear`` -- the identity path carries the gradient."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.fc(x))


class ResidualMLP(nn.Module):
    """The same depth and layers as :func:`mlp`, with a skip connection around each hidden layer.

    The residual branches are scaled by ``1/sqrt(depth)`` at init so the forward signal keeps
    its scale (the usual practice for deep residual stacks, e.g. GPT-2's init).
    """

    def __init__(self, depth: int, width: int = 64, in_dim: int = 32, out_dim: int = 8, activation: str = "tanh"):
        super().__init__()
        self.stem = nn.Linear(in_dim, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, activation) for _ in range(depth - 1)))
        self.head = nn.Linear(width, out_dim)
        with torch.no_grad():
            for b in self.blocks:
                b.fc.weight.mul_(1.0 / math.sqrt(depth))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class SequenceClassifier(nn.Module):
    """A recurrent layer read at its last time step by a linear head.

    Args:
        cell: ``"rnn"`` (vanilla tanh ``nn.RNN``), ``"lstm"`` or ``"gru"``.
        in_dim: input features per step.
        hidden: hidden size.
        out_dim: classes.
        forget_bias: for ``"lstm"``: total forget-gate bias (split over ``bias_ih`` and
            ``bias_hh``), the other biases set to 0; ``None`` keeps PyTorch's init.
        radius: for ``"rnn"``: rescale the recurrent matrix to this spectral radius (``None``
            keeps PyTorch's init).
    """

    def __init__(
        self,
        cell: str,
        in_dim: int,
        hidden: int,
        out_dim: int,
        forget_bias: float | None = None,
        radius: float | None = None,
    ) -> None:
        super().__init__()
        kinds = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
        self.rnn = kinds[cell](in_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out_dim)
        with torch.no_grad():
            if cell == "lstm" and forget_bias is not None:
                # Keras-style: every bias 0 but the forget gate's (PyTorch orders the gates input,
                # forget, cell, output), so the cell starts empty and its memory starts open.
                self.rnn.bias_ih_l0.zero_()
                self.rnn.bias_hh_l0.zero_()
                self.rnn.bias_ih_l0[hidden : 2 * hidden] = forget_bias / 2
                self.rnn.bias_hh_l0[hidden : 2 * hidden] = forget_bias / 2
            if cell == "rnn" and radius is not None:
                w = self.rnn.weight_hh_l0
                w.mul_(radius / torch.linalg.eigvals(w).abs().max())

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])
