"""Models and tasks shared by the tests: the pathologies and the healthy trainings of issue 2."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import gradwatch as gw


def mlp(
    depth: int,
    width: int,
    act: Callable[[], nn.Module],
    init: Callable[[torch.Tensor], object] | None = None,
    din: int = 32,
    dout: int = 10,
    bias_fill: float | None = None,
) -> nn.Sequential:
    """``depth`` hidden Linear+activation blocks and a Linear head; optional weight init."""
    layers: list[nn.Module] = []
    d = din
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, dout))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                if init is not None:
                    init(m.weight)
                    nn.init.zeros_(m.bias)
                if bias_fill is not None and m.out_features == width:
                    m.bias.fill_(bias_fill)
    return model


def he(w: torch.Tensor) -> None:
    nn.init.kaiming_normal_(w, nonlinearity="relu")


def xavier_tanh(w: torch.Tensor) -> None:
    nn.init.xavier_normal_(w, gain=nn.init.calculate_gain("tanh"))


class PreLNTransformer(nn.Module):
    """A small pre-LN transformer language model."""

    def __init__(self, vocab: int = 50, d: int = 64, layers: int = 4, seq: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.emb(x) + self.pos)))


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """A small ResNet with BatchNorm."""

    def __init__(self, c: int = 16, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[ResBlock(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


class GRURegressor(nn.Module):
    """A GRU reading short sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 32, batch_first=True)
        self.fc = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gru(x)[0][:, -1])


def batch(task: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch of a synthetic task (data generated in code)."""
    if task == "cls":
        x = torch.randn(64, 32, generator=gen)
        return x, (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    if task == "img":
        x = torch.randn(32, 3, 16, 16, generator=gen)
        return x, (x[:, 0].mean((1, 2)) > 0).long()
    if task == "tok":
        x = torch.randint(0, 50, (16, 16), generator=gen)
        return x, torch.roll(x, 1, 1)
    if task == "seq":
        x = torch.randn(32, 10, 8, generator=gen)
        return x, x[:, :3, 0].sum(1, keepdim=True)
    raise ValueError(task)


def loss_of(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "tok":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if task == "seq":
        return nn.functional.mse_loss(out, y)
    return nn.functional.cross_entropy(out, y)


def train(
    model: nn.Module,
    task: str,
    steps: int,
    *,
    lr: float = 1e-3,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    **monitor_kwargs: object,
) -> tuple[gw.GradWatch, list[float]]:
    """Train with Adam and a monitor (sinks=[] and on_alert='ignore' unless given); return it and the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    kwargs: dict = {"sinks": [], "on_alert": "ignore", **monitor_kwargs}
    monitor = gw.GradWatch(model, **kwargs)
    losses = []
    for step in range(steps):
        x, y = batch(task, gen)
        loss = loss_of(task, model(x), y)
        if loss_hook is not None:
            loss = loss_hook(step, loss)
        opt.zero_grad()
        loss.backward()
        monitor.step()
        opt.step()
        losses.append(float(loss.detach()))
    monitor.close()
    return monitor, losses
