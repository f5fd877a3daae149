"""Pre-flight on the cases of ``gradwatch bench``: each case's first batch, optimizer and clipping.

Instead of training a case, ``gw.preflight`` runs on its model with the case's first batch, loss,
optimizer and ``clip`` (3 steps on a copy); prints, per case, the expected kind and what pre-flight
found, then a summary: controls silent, faulty cases flagged, first kind as expected. Cases with
their own training loop (or a subprocess) are listed as skipped. Not part of the test suite
(~10 s on 2 CPU cores).

    python benchmarks/preflight_sweep.py [CASE ...]
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

import gradwatch as gw
import gradwatch.bench.controls as controls
import gradwatch.bench.faulty as faulty
from gradwatch.bench import loop, registry

torch.set_num_threads(1)
warnings.simplefilter("ignore")


class _CustomLoop(Exception):
    pass


class _Forward(nn.Module):
    """A case's ``forward(model, x)`` as a module, so pre-flight can call it."""

    def __init__(self, model: nn.Module, forward: Any) -> None:
        super().__init__()
        self.model, self.fn = model, forward

    def forward(self, x: Any) -> Any:
        return self.fn(self.model, x)


def _preflight_train(model, batches, loss_fn, *, steps, optimizer, seed=0, params=None, forward=None, options=None,
                     **_: Any) -> registry.Trial:
    chosen = params(model) if params is not None else (p for p in model.parameters() if p.requires_grad)
    opt = optimizer(chosen)
    x, y = batches(0)
    target = _Forward(model, forward) if forward is not None else model
    report = gw.preflight(target, (x, y), loss_fn, optimizer=opt, clip=(options or {}).get("clip"))
    return registry.Trial(tuple(registry.AlertRecord.from_alert(a) for a in report.alerts), report.steps, seed)


def _no_monitor(*args: Any, **kwargs: Any) -> None:
    raise _CustomLoop


def main(only: list[str]) -> None:
    for module in (faulty, controls, loop):
        module.train = _preflight_train  # type: ignore[attr-defined]
        module.monitor_for = _no_monitor  # type: ignore[attr-defined]
    rows = []
    for name, case in registry.all_cases().items():
        if only and name not in only:
            continue
        if case.subprocess:
            print(f"{name:42s} skipped (subprocess)")
            continue
        try:
            result = case.run()
        except _CustomLoop:
            print(f"{name:42s} skipped (own training loop)")
            continue
        except Exception as exc:  # a case whose oracle needs the training itself
            print(f"{name:42s} skipped ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        trial = result[0] if isinstance(result, list) else result
        got = [(a.kind, a.step, a.layer) for a in trial.alerts]
        rows.append((case.expect, got))
        print(f"{name:42s} expect={case.expect!s:12s} preflight={got[:2]}", flush=True)
    controls_ = [g for e, g in rows if e is None]
    faulty_ = [(e, g) for e, g in rows if e is not None]
    print(
        f"controls silent: {sum(not g for g in controls_)}/{len(controls_)}; faulty flagged: "
        f"{sum(bool(g) for _, g in faulty_)}/{len(faulty_)}, first kind as expected: "
        f"{sum(bool(g) and g[0][0] == e for e, g in faulty_)}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
