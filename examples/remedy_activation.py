"""Remedy: 20-layer MLP: sigmoid vs ReLU / LeakyReLU.

Sigmoid's derivative is at most 1/4, so the gradient shrinks by at least 4x per layer on its way
back through 20 layers. ReLU and LeakyReLU pass it unchanged where active (with He init).

Trains the pathology and the remedys with gradwatch attached (same data, same seed) and prints
what it found. Run alone: ``python examples/remedy_activation.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

import math

import torch

import gradwatch as gw
from gradwatch.reference import get_scenario


def train(scenario, variant) -> tuple[float, list[gw.Alert], dict[str, float]]:
    """Train one variant with a GradWatch attached; return the final loss, the alerts, the last metrics."""
    torch.manual_seed(scenario.seed)
    model = variant.build()
    task = scenario.task()
    if scenario.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=scenario.lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=scenario.lr)
    monitor = gw.GradWatch(
        model,
        clip=variant.clip() if variant.clip else None,
        log_every=scenario.log_every,
        sinks=[],  # print nothing while training; the comparison is printed below
        on_alert="ignore",  # alerts are still recorded in monitor.alerts
    )
    metrics: dict[str, float] = {}
    losses = []
    for step in range(scenario.steps):
        x, y = task.batch(step)
        loss = task.loss(model(x), y)
        loss.backward()
        report = monitor.step()  # after backward, before optimizer.step()
        metrics = report.metrics or metrics
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    monitor.close()
    return sum(losses[-10:]) / 10, monitor.alerts, metrics


def main() -> None:
    torch.set_num_threads(1)  # small models: one thread is fastest
    scenario = get_scenario("activation")
    print(f"{scenario.title} ({scenario.steps} steps)\n")
    for variant in scenario.variants:
        loss, alerts, metrics = train(scenario, variant)
        kinds = ", ".join(dict.fromkeys(a.kind for a in alerts)) or "no alert"
        shown = f"{loss:.3g}" if math.isfinite(loss) else str(loss)
        time_ratio = [v for k, v in metrics.items() if k.startswith("time_grad_ratio/")]
        extra = f", first/last time-step gradient {time_ratio[0]:.1e}" if time_ratio else ""
        print(f"{variant.role:9} {variant.name:13} {variant.summary:48} loss {shown:>8}  {kinds}{extra}")
        if alerts:
            print(f"    {alerts[0].message}")
            print(f"    remedy: {alerts[0].remedies[0]}")


if __name__ == "__main__":
    main()
