"""What :func:`gradwatch.preflight` measured: per-layer rows, the findings, and their printed table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradwatch.alerts import Alert

# Rows printed by ``str(report)`` besides those an alert names: a compact table reads at a glance.
_SHOWN_ROWS = 8


@dataclass(frozen=True)
class LayerRow:
    """One module of the model, in forward order, as pre-flight saw it on its first step.

    Rows cover the modules that own parameters and the leaf modules (activations, pooling, ...);
    a figure that does not apply to a module is ``None``.

    Attributes:
        name: qualified module name (``"(root)"`` for parameters owned by the model itself).
        type: the module's class name.
        output_rms: root mean square of the module's output (the forward signal; the first output
            when the module runs more than once; ``None`` when its output is not a tensor).
        output_finite: whether that output is free of NaN/Inf.
        grad_norm: L2 norm of the module's own parameters' gradients (``None``: no trainable
            parameter, or the loss does not reach them).
        grad_to_param: ``grad_norm`` over the L2 norm of those parameters.
        init_std: standard deviation of the weight (Linear / Conv layers).
        init_expected: the standard deviation of the init scheme that fits the model's activations
            (:meth:`gradwatch.remedies.ModelFacts.scheme`): He ``sqrt(2 / fan_in)`` for the ReLU family
            (or no activation module), Xavier ``gain * sqrt(2 / (fan_in + fan_out))`` with tanh's
            gain 5/3, or 1 for sigmoid, GELU, SiLU.
        init_scheme: ``"He"`` or ``"Xavier"``.
        dead: fraction of units that output zero on every sample (ReLU modules).
        saturated: fraction of outputs at their asymptotes (sigmoid / tanh modules).
        update_ratio: ``||w1 - w0|| / ||w0||`` of the first optimizer step (with ``optimizer=``).
        time_ratio: for recurrent modules, the loss gradient at the sequence's first time step over
            the last (``time_grad_ratio``).
    """

    name: str
    type: str
    output_rms: float | None = None
    output_finite: bool = True
    grad_norm: float | None = None
    grad_to_param: float | None = None
    init_std: float | None = None
    init_expected: float | None = None
    init_scheme: str | None = None
    dead: float | None = None
    saturated: float | None = None
    update_ratio: float | None = None
    time_ratio: float | None = None

    @property
    def init_factor(self) -> float | None:
        """``init_std / init_expected``: 1 is the He/Xavier scale."""
        if self.init_std is None or not self.init_expected:
            return None
        return self.init_std / self.init_expected


@dataclass
class PreflightReport:
    """The result of :func:`gradwatch.preflight`.

    Attributes:
        model: the model's class name.
        steps: forward/backward steps run on the copy.
        batch_size: length of the batch's first dimension (``None`` when it has no tensor).
        input_rms: root mean square of the floating-point model inputs (``None``: integer inputs
            such as token ids).
        losses: the loss at each step.
        layers: one :class:`LayerRow` per module, in forward order.
        alerts: the findings, first seen first (the earliest is the likeliest cause); within a step
            an explosion before its non-finite values, dead or saturated units before vanishing
            gradients, then in forward order;
            each with the ranked remedies of a training alert.
        optimizer: the optimizer's class name and first learning rate (``None`` without one).
        seconds: wall-clock time of the pre-flight.
    """

    model: str
    steps: int
    batch_size: int | None
    input_rms: float | None
    losses: list[float]
    layers: list[LayerRow]
    alerts: list[Alert] = field(default_factory=list)
    optimizer: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No finding: nothing pre-flight checks is wrong with this model on this batch."""
        return not self.alerts

    @property
    def kinds(self) -> list[str]:
        """The distinct alert kinds, in the order of :attr:`alerts`."""
        return list(dict.fromkeys(a.kind for a in self.alerts))

    def layer(self, name: str) -> LayerRow:
        """The row of the module called ``name``.

        Raises:
            KeyError: no such module (the message lists the first names).
        """
        for row in self.layers:
            if row.name == name:
                return row
        names = ", ".join(r.name for r in self.layers[:8])
        raise KeyError(f"no layer {name!r} in this report; layers: {names}{', ...' if len(self.layers) > 8 else ''}")

    def signal(self) -> tuple[float, float, int] | None:
        """The forward signal through the weight layers: ``(first output RMS, last, weight layers)``.

        ``None`` with fewer than two weight layers whose output RMS is known.
        """
        rms = [r.output_rms for r in self.layers if r.init_std is not None and r.output_rms is not None]
        return (rms[0], rms[-1], len(rms)) if len(rms) >= 2 else None

    def __str__(self) -> str:
        return format_report(self)


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _deviation(row: LayerRow, median_log: float) -> float:
    """How far a row is from the typical layer: orders of magnitude of gradient, init off-scale, units lost."""
    d = 0.0
    if row.grad_norm is not None:
        d = abs(math.log10(max(row.grad_norm, 1e-45)) - median_log)
    f = row.init_factor
    if f is not None and f > 0:
        d = max(d, abs(math.log10(f)) * 4)  # 1.5x off the He/Xavier scale weighs like 0.7 decades
    for frac in (row.dead, row.saturated):
        if frac is not None:  # healthy ReLU layers have 30-50% of units dead on a batch: rank what is beyond
            d = max(d, 10 * max(0.0, frac - 0.5))
    if not row.output_finite:
        d = math.inf
    return d


def _shown(report: PreflightReport) -> list[LayerRow]:
    """The worst rows (and every row an alert names), kept in forward order."""
    named = {a.layer for a in report.alerts}
    grads = sorted(math.log10(max(r.grad_norm, 1e-45)) for r in report.layers if r.grad_norm is not None)
    median_log = grads[len(grads) // 2] if grads else 0.0
    ranked = sorted(
        (i for i, r in enumerate(report.layers) if r.name not in named),
        key=lambda i: -_deviation(report.layers[i], median_log),
    )
    keep = {i for i, r in enumerate(report.layers) if r.name in named} | set(ranked[:_SHOWN_ROWS])
    return [r for i, r in enumerate(report.layers) if i in keep]


def format_report(report: PreflightReport) -> str:
    """The compact text of ``print(report)``: a summary, the worst layers, the findings."""
    n = len(report.alerts)
    verdict = "ok" if report.ok else f"{n} finding{'s' if n != 1 else ''}"
    batch = f" on a batch of {report.batch_size}" if report.batch_size is not None else ""
    opt = f" with {report.optimizer}" if report.optimizer else ""
    lines = [f"gradwatch pre-flight: {report.model}, {report.steps} step(s){batch}{opt}: {verdict}"]
    facts = [f"input rms {_num(report.input_rms)}" if report.input_rms is not None else "integer inputs"]
    if report.losses:
        facts.append("loss " + " -> ".join(_num(x) for x in report.losses))
    sig = report.signal()
    if sig is not None:
        first, last, k = sig
        per = (last / first) ** (1 / (k - 1)) if first > 0 and last > 0 else 0.0
        facts.append(f"forward signal {_num(first)} -> {_num(last)} over {k} weight layers (x{_num(per)} per layer)")
    lines.append("  " + "; ".join(facts))
    rows = _shown(report)
    if rows:
        head = ("layer", "type", "out rms", "grad norm", "grad/w", "init x", "dead/sat", "upd/w")
        table = [head]
        for r in rows:
            frac = r.dead if r.dead is not None else r.saturated
            init = "-" if r.init_factor is None else f"{_num(r.init_factor)} {r.init_scheme}"
            out = _num(r.output_rms) if r.output_finite else "nonfinite"
            table.append((r.name, r.type, out, _num(r.grad_norm), _num(r.grad_to_param), init, _pct(frac),
                          _num(r.update_ratio)))
        widths = [max(len(row[c]) for row in table) for c in range(len(head))]
        hidden = len(report.layers) - len(rows)
        lines.append(f"  worst layers (forward order{f'; {hidden} more not shown' if hidden else ''}):")
        for row in table:
            lines.append("    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for a in report.alerts:
        lines.append(f"  [{a.severity}] {a.kind}: {a.message}")
        for k, remedy in enumerate(a.remedies[:2], 1):
            lines.append(f"      {k}. {remedy}")
    return "\n".join(lines)
