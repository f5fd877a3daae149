"""The loop shared by the ``remedy_*.py`` examples: train a reference scenario's pathology and
remedies with gradwatch attached, and print what it found.

The loop is written out (not ``gradwatch.reference.run_variant``) so the examples show how
gradwatch sits in an ordinary training loop.
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
        track_time=scenario.track_time,  # profile nn.RNN/LSTM/GRU inputs per time step
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


def compare(name: str) -> None:
    """Train every variant of scenario ``name`` and print one line each, with the first alert."""
    torch.set_num_threads(1)  # small models: one thread is fastest
    scenario = get_scenario(name)
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
