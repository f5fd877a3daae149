"""Small models the cases train: the ones users write (MLPs, CNNs, LeNet, RNNs, attention, a VAE)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "VAE", "Attention", "Exp", "LeNet", "LoRALinear", "SequenceClassifier", "TinyTransformerLM", "TinyViT", "cnn",
    "init_", "mlp",
]


class Exp(nn.Module):
    """``exp`` as an activation (AUTOTRAINER's improper-activation case)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(x)


def mlp(sizes: list[int], act: Callable[[], nn.Module] = nn.ReLU, batchnorm: bool = False) -> nn.Sequential:
    """``Linear`` layers of ``sizes[i] -> sizes[i+1]`` with ``act`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(sizes[i + 1]))
            layers.append(act())
    return nn.Sequential(*layers)


def init_(model: nn.Module, scheme: str, *, gain: float = 1.0, nonlinearity: str = "relu",
          bias: float | None = 0.0) -> nn.Module:
    """Initialise every ``Linear``/``Conv`` weight of ``model`` in place: ``"he"`` or ``"xavier"``, times ``gain``.

    ``bias``: the value every bias is set to (``None`` keeps PyTorch's).
    """
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity=nonlinearity)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(nonlinearity))
            else:
                raise ValueError(f"`scheme` must be 'he' or 'xavier'; got {scheme!r}")
            m.weight.mul_(gain)
            if bias is not None and m.bias is not None:
                m.bias.fill_(bias)
    return model


def cnn(channels: int = 1, classes: int = 4, size: int = 16, act: Callable[[], nn.Module] = nn.ReLU,
        batchnorm: bool = False, width: int = 16) -> nn.Sequential:
    """Two conv blocks (conv, [BN], act, max-pool) and a linear head."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), *([nn.BatchNorm2d(cout)] if batchnorm else []), act(),
                nn.MaxPool2d(2)]

    return nn.Sequential(*block(channels, width), *block(width, 2 * width), nn.Flatten(),
                         nn.Linear(2 * width * (size // 4) ** 2, classes))


class LeNet(nn.Module):
    """LeNet-5 on 16x16 images, with ``extra`` further dense layers (AUTOTRAINER's deep-sigmoid LeNet)."""

    def __init__(self, act: Callable[[], nn.Module] = nn.Sigmoid, classes: int = 4, extra: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), act(), nn.AvgPool2d(2),
                                      nn.Conv2d(6, 16, 5), act(), nn.AvgPool2d(2), nn.Flatten())
        dense: list[nn.Module] = [nn.Linear(16 * 2 * 2, 120), act(), nn.Linear(120, 84), act()]
        for _ in range(extra):
            dense += [nn.Linear(84, 84), act()]
        self.classifier = nn.Sequential(*dense, nn.Linear(84, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class SequenceClassifier(nn.Module):
    """A recurrent layer read at its last time step by a linear head."""

    def __init__(self, cell: str, in_dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](in_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Attention(nn.Module):
    """Single-head self-attention, then a ReLU MLP and a head, on ``(batch, length, dim)`` inputs.

    Args:
        dim: model width.
        classes: outputs (read from the mean over positions).
        scaled: divide the scores by ``sqrt(dim)`` (``False``: the missing scale).
        qk_gain: factor on the q/k weights after PyTorch's init.
    """

    def __init__(self, dim: int = 32, classes: int = 4, scaled: bool = True, qk_gain: float = 1.0) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)
        self.scale = 1 / math.sqrt(dim) if scaled else 1.0
        with torch.no_grad():
            self.q.weight.mul_(qk_gain)
            self.k.weight.mul_(qk_gain)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) * self.scale
        h = x + torch.softmax(scores, -1) @ self.v(x)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.head(h.mean(1))


class _Block(nn.Module):
    """Pre-LN transformer block (causal when asked)."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1) if self.causal else None
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformerLM(nn.Module):
    """A causal pre-LN transformer language model."""

    def __init__(self, vocab: int = 32, dim: int = 48, heads: int = 4, depth: int = 2, length: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = nn.Sequential(*(_Block(dim, heads, causal=True) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos[:, : idx.shape[1]])))


class TinyViT(nn.Module):
    """A vision transformer whose class token and position embeddings start at zero (as in ViT/DeiT code)."""

    def __init__(self, size: int = 16, patch: int = 4, dim: int = 48, heads: int = 4, depth: int = 2,
                 classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        n = (size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.Sequential(*(_Block(dim, heads, causal=False) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.ln(self.blocks(t))[:, 0])


class VAE(nn.Module):
    """A variational auto-encoder on flattened images; ``forward`` returns ``(reconstruction, mu, logvar)``."""

    def __init__(self, inp: int = 256, hidden: int = 128, latent: int = 8) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(inp, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, inp))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.enc(x.flatten(1))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.dec(z), mu, logvar


class LoRALinear(nn.Module):
    """A frozen ``Linear`` plus a trainable low-rank update ``B @ A`` with ``B`` zero at init (LoRA)."""

    def __init__(self, inp: int, out: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(inp, out)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, inp) / math.sqrt(inp))
        self.lora_b = nn.Parameter(torch.zeros(out, rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + x @ self.lora_a.t() @ self.lora_b.t()
