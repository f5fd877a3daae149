"""Train one variant of a scenario with gradwatch attached and summarise what it saw."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradwatch import schema
from gradwatch.alerts import Alert
from gradwatch.monitor import GradWatch
from gradwatch.reference.scenarios import Scenario, Variant
from gradwatch.sinks.base import Sink
from gradwatch.sinks.jsonl import JSONL

Progress = Callable[[int, int], None]


@dataclass
class RunResult:
    """What one training run of a scenario variant showed.

    Attributes:
        scenario: scenario name.
        variant: variant name.
        role: ``"pathology"`` or ``"remedy"``.
        expect: the alert kind the pathology must raise (``None`` for a remedy).
        steps: optimizer steps run.
        alerts: every alert gradwatch emitted.
        losses: ``(step, loss)`` at each logging step and at the last step.
        final_loss: mean loss over the last 10 steps (``nan`` if it diverged).
        layer_ratio: median over logging steps of the first layer's gradient norm over the last
            layer's (layers in forward order).
        time_ratio: median over logging steps of ``time_grad_ratio/*`` (recurrent models only).
        seconds: wall-clock time of the run.
        jsonl: the run's JSONL file, when one was written.
    """

    scenario: str
    variant: str
    role: str
    expect: str | None
    steps: int
    alerts: list[Alert] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    final_loss: float = math.nan
    layer_ratio: float | None = None
    time_ratio: float | None = None
    seconds: float = 0.0
    jsonl: Path | None = None

    @property
    def kinds(self) -> list[str]:
        """Distinct alert kinds, in order of first appearance."""
        return list(dict.fromkeys(a.kind for a in self.alerts))

    @property
    def ok(self) -> bool:
        """A pathology raised its expected kind; a remedy raised nothing."""
        return self.expect in self.kinds if self.role == "pathology" else not self.alerts


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else math.sqrt(xs[n // 2 - 1] * xs[n // 2]) if xs[n // 2 - 1] > 0 else xs[n // 2]


def run_variant(
    scenario: Scenario,
    variant: Variant,
    *,
    steps: int | None = None,
    out_dir: str | Path | None = None,
    sinks: Sequence[Sink] = (),
    progress: Progress | None = None,
) -> RunResult:
    """Train ``variant`` of ``scenario`` with a :class:`~gradwatch.GradWatch` attached.

    Args:
        scenario: the scenario.
        variant: one of its variants.
        steps: optimizer steps (default: the scenario's budget).
        out_dir: where to write ``<scenario>-<variant>.jsonl`` (``None``: no file). The demo owns these
            files: an earlier file of the same name is replaced.
        sinks: further sinks (e.g. W&B); alerts are never printed as warnings here.
        progress: called with ``(step + 1, steps)`` after every step.

    Returns:
        The :class:`RunResult`.
    """
    n = scenario.steps if steps is None else steps
    task = scenario.task()
    torch.manual_seed(scenario.seed)
    model = variant.build()
    params = [p for p in model.parameters() if p.requires_grad]
    if scenario.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=scenario.lr)
    else:
        opt = torch.optim.Adam(params, lr=scenario.lr)
    all_sinks: list[Sink] = list(sinks)
    path = None
    if out_dir is not None:
        path = Path(out_dir) / f"{scenario.name}-{variant.name}.jsonl"
        all_sinks.insert(0, JSONL(path, overwrite=True))
    monitor = GradWatch(
        model,
        clip=variant.clip() if variant.clip is not None else None,
        sinks=all_sinks,
        log_every=scenario.log_every,
        on_alert="ignore",
        track_time=scenario.track_time,
    )
    result = RunResult(scenario.name, variant.name, variant.role, variant.expect, n, jsonl=path)
    logged: list[tuple[int, torch.Tensor]] = []
    tail: list[torch.Tensor] = []
    t0 = time.perf_counter()
    model.train()
    try:
        for step in range(n):
            x, y = task.batch(step)
            loss = task.loss(model(x), y)
            loss.backward()
            monitor.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            d = loss.detach()
            if step % scenario.log_every == 0 or step == n - 1:
                logged.append((step, d))
            if step >= n - 10:
                tail.append(d)
            if progress is not None:
                progress(step + 1, n)
    finally:
        monitor.close()
    result.seconds = time.perf_counter() - t0
    result.alerts = monitor.alerts
    result.losses = [(s, float(v)) for s, v in logged]
    result.final_loss = float(torch.stack(tail).mean()) if tail else math.nan
    layers = monitor.layers
    hist = list(monitor.history)
    if len(layers) >= 2:
        first, last = schema.metric_key(schema.GRAD_NORM, layers[0]), schema.metric_key(schema.GRAD_NORM, layers[-1])
        result.layer_ratio = _median(
            [h[first] / h[last] for h in hist if h.get(last, 0) > 0 and first in h and math.isfinite(h[first])]
        )
    times = [v for h in hist for v in schema.per_layer(h, schema.TIME_GRAD_RATIO).values()]
    result.time_ratio = _median(times) if times else None
    if path is not None:
        sizes = {
            (name or "(root)"): sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
            for name, m in model.named_modules()
        }
        _append_summary(path, scenario, variant, result, {k: v for k, v in sizes.items() if v > 0})
    return result


def _append_summary(path: Path, scenario: Scenario, variant: Variant, r: RunResult, numel: dict[str, int]) -> None:
    """A ``"summary"`` record after the monitor's own: the scenario, the loss curve, the outcome."""
    if not path.exists():  # not rank 0: the monitor wrote nothing
        return
    sink = JSONL(path, append=True)
    try:
        sink.log_record(
            {
                "type": "summary",
                "scenario": scenario.name,
                "title": scenario.title,
                "variant": variant.name,
                "role": variant.role,
                "expect": variant.expect,
                "summary": variant.summary,
                "steps": r.steps,
                "loss": [[s, v] for s, v in r.losses],
                "final_loss": r.final_loss,
                "layer_ratio": r.layer_ratio,
                "time_ratio": r.time_ratio,
                "alert_kinds": r.kinds,
                "seconds": r.seconds,
                "numel": numel,
                "story": scenario.story,
            }
        )
    finally:
        sink.close()


def run_scenario(
    scenario: Scenario,
    *,
    steps: int | None = None,
    out_dir: str | Path | None = None,
    sinks_for: Callable[[Scenario, Variant], Sequence[Sink]] | None = None,
    progress_for: Callable[[Scenario, Variant], Progress | None] | None = None,
) -> list[RunResult]:
    """Run every variant of ``scenario`` (pathologies first); see :func:`run_variant`."""
    out = []
    for v in scenario.variants:
        sinks = sinks_for(scenario, v) if sinks_for is not None else ()
        progress = progress_for(scenario, v) if progress_for is not None else None
        out.append(run_variant(scenario, v, steps=steps, out_dir=out_dir, sinks=sinks, progress=progress))
    return out
