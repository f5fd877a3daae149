"""Pre-flight: check a model on one batch before you train it.

A 20-layer ReLU MLP with PyTorch's default init (0.41x the He scale) loses its gradient on the
way back to the first layers; ``gw.preflight`` says so at step 0, on a copy of the model, before
any real step is taken -- and the same call on the He-initialised model says ``ok``.

Run: ``python examples/preflight.py`` (about a second on one CPU core).
"""

from __future__ import annotations

import torch
from torch import nn

import gradwatch as gw


def mlp(depth: int = 20, width: int = 128, he_init: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 32
    for _ in range(depth):
        linear = nn.Linear(d, width)
        if he_init:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


if __name__ == "__main__":
    torch.manual_seed(0)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    for he_init in (False, True):
        model = mlp(he_init=he_init)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        report = gw.preflight(model, (x, y), nn.functional.cross_entropy, optimizer=optimizer)
        print(report)
        print(f"he_init={he_init}: ok={report.ok} kinds={report.kinds}")
        print()
