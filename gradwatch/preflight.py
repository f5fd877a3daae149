"""Pre-flight: find the pathology before the first real step, with one call on one batch.

:func:`preflight` runs a few forward/backward steps on a deep copy of the model (and of the
optimizer, when given) with a :class:`~gradwatch.GradWatch` watching the copy, and returns a
:class:`~gradwatch.preflight_report.PreflightReport`: per-layer rows in forward order (the forward
signal, the gradient, the init scale against He/Xavier, dead/saturated units, the first update)
and the alerts training would raise, with the same ranked remedies. The user's model, optimizer,
clipper and random-number state are exactly as before the call.

Persistence, decided here: in training a condition must hold for ``persist`` consecutive steps,
because one batch of a changing stream, on weights that move, can be unrepresentative. Pre-flight
asks a different question -- is the model *as it starts* broken on *this* batch -- and the
conditions it checks (depth profile, gradient-to-weight ratio, dead and saturated units, non-finite
values, the profile across time) are set by the architecture and the init, which the first steps
do not change. So the copy's detectors run with ``persist=1`` (``TimeVanishing`` with
``warmup=1``): a condition is reported on the step it is first seen, step 0 for every pathology of
the reference scenarios. Their thresholds keep their margin to healthy models (1e-4 against ~1e-2
for the depth profile, and so on): only the repetition requirement is dropped. Three cases need
more than one look and are decided on the steps themselves:

* an exactly zero gradient on a layer whose weights are not zero, while a zero-initialised layer of
  the model does receive a gradient: that layer blocks the path until its first update (LoRA's
  ``B = 0``, zero-init residual branches and heads) -- a transient, not reported;
* divergence, which needs steps: with ``optimizer=``, a loss on the (same) pre-flight batch that
  rises at every step to at least twice its first value while the gradient norm grows;
* a layer the loss never reaches: ``NoGradient`` with a window of all the steps (a layer used on
  some batches only is not reported after one).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch import schema
from gradwatch.activations import _unit_dims, activation_kind
from gradwatch.alerts import Alert
from gradwatch.clip import Clipper
from gradwatch.detectors import (
    Dead,
    Detector,
    Exploding,
    NoGradient,
    NonFinite,
    Saturated,
    TimeVanishing,
    Vanishing,
)
from gradwatch.errors import GradWatchAlertError, warn_user
from gradwatch.layers import ROOT_NAME, Layer, discover_layers, unwrap_model
from gradwatch.monitor import GradWatch
from gradwatch.preflight_report import LayerRow, PreflightReport
from gradwatch.remedies import ModelFacts, inspect_model, remedies_for

__all__ = ["preflight", "preflight_training_step", "run_callback_preflight", "run_preflight"]

log = logging.getLogger("gradwatch")

# Divergence: gradient descent with a step inside its stable range lowers the loss on the batch it
# steps on (the descent lemma: lr < 2/L); a loss that rises at *every* step on that same batch means
# each update overshoots. Twice the first value: healthy runs rise at most once (Adam's first
# sign-like step, SGD with momentum: 1.2-1.3x, then fall; measured on the test suite's models at
# lr 1e-3..1e-1), and dropout's mask noise stays far below 2x.
DIVERGENCE_FACTOR = 2.0
# Findings are listed first seen first: the earliest is the likeliest cause. Within a step, the kinds
# that cause others come first: an explosion before the Inf it produces, dead or saturated units
# before the vanishing gradient of the layers below them; vanishing, most often a consequence, last.
_CAUSE_RANK = {
    k: i for i, k in enumerate((schema.EXPLODING, schema.NONFINITE, schema.DEAD, schema.SATURATED, schema.NO_GRADIENT,
                                schema.VANISHING))
}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def preflight_detectors(steps: int) -> list[Detector]:
    """The detectors pre-flight runs on the copy: the defaults' thresholds, reported on first sight.

    ``NoGradient`` needs a layer to get no gradient at every one of the ``steps`` (a layer used on
    some batches only is not "never reached"). No ``Spike``: a spike is a jump against a history,
    which the first steps do not have.
    """
    return [NonFinite(), Vanishing(persist=1), Exploding(persist=1), Dead(persist=1), Saturated(persist=1),
            TimeVanishing(warmup=1), NoGradient(window=steps)]


# ---------------------------------------------------------------------------------------------- batch
@dataclass
class _Call:
    """How a batch is fed: ``model(*args, **kwargs)``, then ``loss_fn(output, target)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: Any


def _split_batch(batch: Any, with_loss_fn: bool) -> _Call:
    if isinstance(batch, Tensor):
        return _Call((batch,), {}, batch)
    if isinstance(batch, Mapping):
        return _Call((), dict(batch), batch)
    if isinstance(batch, (tuple, list)):
        if not with_loss_fn:
            return _Call(tuple(batch), {}, None)
        if len(batch) < 2:
            raise ValueError(
                f"`batch` as a tuple or list is (*inputs, target) when `loss_fn` is given, so it needs at least 2 "
                f"elements; got {len(batch)}"
            )
        return _Call(tuple(batch[:-1]), {}, batch[-1])
    raise TypeError(
        f"`batch` must be a Tensor, a tuple or list (*inputs, target), or a dict of keyword inputs; "
        f"got {type(batch).__name__}"
    )


def _own_loss(output: Any) -> Tensor | None:
    """The loss a model returns itself: a scalar tensor, ``output.loss``, or ``output["loss"]``."""
    if isinstance(output, Tensor):
        return output if output.dim() == 0 else None
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) and loss.dim() == 0 else None


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a Tensor of shape {tuple(output.shape)}"
    return f"a {type(output).__name__}"


def _first_float(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x if x.is_floating_point() else None
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for item in items:
        t = _first_float(item)
        if t is not None:
            return t
    return None


def _batch_size(x: Any) -> int | None:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() else None
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for item in items:
        n = _batch_size(item)
        if n is not None:
            return n
    return None


def _rms(t: Tensor) -> float:
    return float(t.detach().float().square().mean().sqrt()) if t.numel() else 0.0


# ---------------------------------------------------------------------------------------------- copies
class _RngState:
    """Every random-number state a forward pass may draw from: torch (CPU, CUDA), ``random``, numpy."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # reading it would initialise CUDA
        self.cuda = torch.cuda.get_rng_state_all() if cuda else None
        self.python = random.getstate()
        np = sys.modules.get("numpy")
        self.numpy = np.random.get_state() if np is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np = sys.modules.get("numpy")
        if np is not None and self.numpy is not None:
            np.random.set_state(self.numpy)


def _is_torch_hook(hook: Any) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial
    module = str(getattr(fn, "__module__", "") or "")
    return module == "torch" or module.startswith("torch.")


def _strip_hooks(model: nn.Module) -> None:
    """Drop the copied module hooks that torch itself did not install.

    A deep copy keeps every hook, and a hook is a function of its owner: a monitor watching the
    original (its activation tracker, its forward-order recorder) or the user's own logging or
    feature hook would receive the copy's forwards and change state outside the copy. Torch's own
    hooks are part of the model (``weight_norm``'s and ``spectral_norm``'s pre-hooks) and stay.
    """
    for m in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if not hooks:
                continue
            for key in [k for k, h in hooks.items() if not _is_torch_hook(h)]:
                del hooks[key]
                for flag in _HOOK_FLAGS:
                    getattr(m, flag, {}).pop(key, None)


def _copy_model(model: nn.Module) -> tuple[nn.Module, dict[int, Any]]:
    """A deep copy, and the memo that maps each original object's id to its copy.

    A LightningModule leaves its Trainer out of copies itself (``__getstate__``).
    """
    memo: dict[int, Any] = {}
    twin = copy.deepcopy(model, memo)
    _strip_hooks(twin)
    for p in twin.parameters():
        p.grad = None
    twin.train()
    return twin, memo


def _copy_optimizer(optimizer: torch.optim.Optimizer, memo: Mapping[int, Any]) -> torch.optim.Optimizer:
    """The same optimizer class over the copy's parameters, with the same groups and state (by position)."""
    groups = []
    for g in optimizer.param_groups:
        params = []
        for p in g["params"]:
            twin = memo.get(id(p))
            if not isinstance(twin, Tensor):
                raise ValueError(
                    f"`optimizer` ({type(optimizer).__name__}) holds a parameter of shape {tuple(p.shape)} that is "
                    "not one of `model`'s; pre-flight copies the model and needs the optimizer over its parameters"
                )
            params.append(twin)
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    # Only the defaults the constructor takes (AdamW keeps `decoupled_weight_decay` in its defaults
    # but does not accept it); the groups carry every hyper-parameter anyway.
    accepted = inspect.signature(type(optimizer).__init__).parameters
    takes_any = any(a.kind is inspect.Parameter.VAR_KEYWORD for a in accepted.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if takes_any or k in accepted}
    twin_opt = type(optimizer)(groups, **defaults)
    # A deep copy first: load_state_dict keeps same-device tensors as they are, and the copy's steps
    # would then update the user's moments in place.
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin_opt


def _optimizer_label(optimizer: torch.optim.Optimizer) -> str:
    lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
    lr = float(lr) if isinstance(lr, (int, float, Tensor)) else None
    return f"{type(optimizer).__name__}(lr={lr:g})" if lr is not None else type(optimizer).__name__


# ---------------------------------------------------------------------------------------------- probe
@dataclass
class _Seen:
    rms: float | None
    finite: bool
    dead: float | None
    saturated: float | None


class _SignalProbe:
    """Forward hooks on the copy: each module's first output (RMS, finiteness, dead/saturated units)."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: dict[str, _Seen] = {}  # insertion order = forward order
        self.types: dict[str, str] = {}
        self.armed = True
        self._handles = []
        for name, m in model.named_modules():
            owns = any(True for _ in m.parameters(recurse=False))
            if owns or not any(True for _ in m.children()):
                label = name or ROOT_NAME
                self.types[label] = type(m).__name__
                self._handles.append(m.register_forward_hook(self._hook(label, activation_kind(m))))

    def _hook(self, label: str, kind: str | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.armed or label in self.seen:
                return
            y = output if isinstance(output, Tensor) else _first_float(output)
            if y is None or not y.is_floating_point():
                self.seen[label] = _Seen(None, True, None, None)
                return
            with torch.no_grad():
                y = y.detach()
                dead = sat = None
                if kind == "relu" and y.numel():
                    dead = float(1.0 - (y.amax(dim=_unit_dims(y)) > 0).float().mean()) if y.dim() else float(y <= 0)
                elif kind == "sigmoid" and y.numel():
                    sat = float(((y < 0.01) | (y > 0.99)).float().mean())
                elif kind == "tanh" and y.numel():
                    sat = float((y.abs() > 0.99).float().mean())
                self.seen[label] = _Seen(_rms(y), bool(torch.isfinite(y).all()), dead, sat)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _init_scale(module: nn.Module, facts: ModelFacts) -> tuple[float, float, str] | None:
    """(std, expected std, scheme) of a Linear/Conv weight, for the scheme that fits the model's activations.

    The scheme and its gain are :meth:`~gradwatch.remedies.ModelFacts.scheme`'s, the expected std the
    one :func:`~gradwatch.remedies.inspect_model` compares with: He ``gain / sqrt(fan_in)``, Xavier
    ``gain * sqrt(2 / (fan_in + fan_out))``.
    """
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or module.weight is None:
        return None
    w = module.weight.detach()
    if w.dim() < 2 or w.numel() < 2 or w.is_meta:
        return None
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
    std = float(w.float().std())
    scheme, gain, _ = facts.scheme()
    expected = gain / math.sqrt(fan_in) if scheme == "He" else gain * math.sqrt(2.0 / (fan_in + fan_out))
    return std, expected, scheme


# ---------------------------------------------------------------------------------------------- run
@dataclass
class _Trace:
    """What the steps on the copy produced, by name."""

    losses: list[float]
    totals: list[float]
    first_metrics: dict[str, float]
    time_ratio: dict[str, float]
    update_ratio: dict[str, float]
    init: dict[str, tuple[float, float, str]]  # weight std, He/Xavier std, scheme: read before any update


def _flat(layer: Layer) -> Tensor:
    """The layer's parameters as one float32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).float() for p in layer.params])


def _update_ratios(layers: list[Layer], before: list[Tensor]) -> dict[str, float]:
    """``||w1 - w0|| / ||w0||`` per layer, leaving out zero-initialised ones (no scale to compare with)."""
    out = {}
    for layer, w0 in zip(layers, before):
        n0 = float(w0.norm())
        if n0 > 1e-6 * math.sqrt(w0.numel()):
            out[layer.name] = float((_flat(layer) - w0).norm()) / n0
    return out


def run_preflight(
    model: nn.Module,
    compute_loss: Callable[[nn.Module], Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = 3,
    clip: Clipper | None = None,
    inputs: Any = None,
) -> PreflightReport:
    """The pre-flight engine: ``compute_loss(copy) -> loss`` runs one forward of the model's copy.

    :func:`preflight` builds ``compute_loss`` from a batch, :func:`preflight_training_step` from a
    LightningModule's ``training_step``. ``inputs`` is only read for the input scale and batch size.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1; got {steps!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be None or a torch.optim.Optimizer; got {type(optimizer).__name__}")
    model = unwrap_model(model)
    t0 = time.perf_counter()
    rng = _RngState()
    try:
        twin, memo = _copy_model(model)
        twin_opt = _copy_optimizer(optimizer, memo) if optimizer is not None else None
        trace, facts, monitor, probe = _steps(twin, twin_opt, compute_loss, steps, copy.deepcopy(clip))
    finally:
        rng.restore()
    report = _report(model, twin, twin_opt, facts, monitor, probe, trace, steps, inputs)
    report.seconds = time.perf_counter() - t0
    return report


def _steps(
    twin: nn.Module,
    opt: torch.optim.Optimizer | None,
    compute_loss: Callable[[nn.Module], Tensor],
    steps: int,
    clip: Clipper | None,
) -> tuple[_Trace, ModelFacts, GradWatch, _SignalProbe]:
    facts = inspect_model(twin)
    # Recurrent modules are profiled across time by the monitor's default (track_time=None).
    monitor = GradWatch(
        twin, detectors=preflight_detectors(steps), clip=clip, on_nonfinite="skip", on_alert="ignore", sinks=[],
        log_every=1, track_activations=True,
    )
    layers = discover_layers(twin, "module")
    probe = _SignalProbe(twin)
    modules = {(name or ROOT_NAME): m for name, m in twin.named_modules()}
    init = {name: s for name, m in modules.items() if (s := _init_scale(m, facts)) is not None}
    trace = _Trace([], [], {}, {}, {}, init)
    try:
        for step in range(steps):
            probe.armed = step == 0
            loss = compute_loss(twin)
            if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
                raise ValueError(
                    f"the loss must be a scalar Tensor that requires grad; got {_describe(loss)}"
                    + ("" if not isinstance(loss, Tensor) or loss.requires_grad else " that does not require grad")
                )
            loss.backward()
            trace.losses.append(float(loss.detach()))
            metrics = monitor.step(loss=loss.detach(), optimizer=opt).metrics or {}
            trace.totals.append(metrics.get(schema.GRAD_NORM_TOTAL, math.nan))
            if step == 0:
                trace.first_metrics = dict(metrics)
            for layer, r in schema.per_layer(metrics, schema.TIME_GRAD_RATIO).items():
                trace.time_ratio.setdefault(layer, r)
            if opt is not None:
                before = [_flat(x) for x in layers] if step == 0 else None
                opt.step()
                if before is not None:
                    trace.update_ratio = _update_ratios(layers, before)
            for p in twin.parameters():
                p.grad = None
    finally:
        probe.remove()
        monitor.close()
    return trace, facts, monitor, probe


# ---------------------------------------------------------------------------------------------- findings
def _rows(probe: _SignalProbe, trace: _Trace) -> list[LayerRow]:
    m = trace.first_metrics
    gn = schema.per_layer(m, schema.GRAD_NORM)
    g2p = schema.per_layer(m, schema.GRAD_TO_PARAM)
    order = list(probe.seen) + [n for n in probe.types if n not in probe.seen]
    rows = []
    for name in order:
        seen = probe.seen.get(name)
        init = trace.init.get(name)
        rows.append(
            LayerRow(
                name=name,
                type=probe.types[name],
                output_rms=seen.rms if seen else None,
                output_finite=seen.finite if seen else True,
                grad_norm=gn.get(name),
                grad_to_param=g2p.get(name),
                init_std=init[0] if init else None,
                init_expected=init[1] if init else None,
                init_scheme=init[2] if init else None,
                dead=seen.dead if seen else None,
                saturated=seen.saturated if seen else None,
                update_ratio=trace.update_ratio.get(name),
                time_ratio=trace.time_ratio.get(name),
            )
        )
    return rows


def _transient_zero(alert: Alert, rows: dict[str, LayerRow], facts: ModelFacts) -> bool:
    """A zero-gradient finding on non-zero weights that a zero-initialised layer's first update lifts."""
    row = rows.get(alert.layer) if alert.layer is not None else None
    if alert.kind != schema.VANISHING or row is None or row.grad_norm != 0.0 or alert.layer in facts.zero_init:
        return False
    return any((rows[z].grad_norm or 0.0) > 0 for z in facts.zero_init if z in rows)


def _divergence(trace: _Trace, opt_label: str, facts: ModelFacts) -> Alert | None:
    ls, gs = trace.losses, trace.totals
    if len(ls) < 3 or not all(math.isfinite(x) for x in ls) or ls[0] <= 0:
        return None
    rising = all(b > a for a, b in zip(ls, ls[1:]))
    factor = ls[-1] / ls[0]
    if not (rising and factor >= DIVERGENCE_FACTOR and gs[-1] > gs[0]):
        return None
    curve = " -> ".join(f"{x:.3g}" for x in ls)
    lower = (
        f"Lower the learning rate of {opt_label} (try 1/10), or add a warm-up: on the pre-flight batch every update "
        f"overshoots, so the loss on that same batch rose at every step ({curve})."
    )
    rest = [r for r in remedies_for(schema.EXPLODING, facts, typical_norm=gs[0]) if not r.startswith("Lower the")]
    return Alert(
        kind=schema.EXPLODING,
        step=len(ls) - 1,
        layer=None,
        value=factor,
        threshold=DIVERGENCE_FACTOR,
        severity="warning",
        message=(
            f"Divergence at step {len(ls) - 1}: with {opt_label} the loss on the pre-flight batch rose at every step, "
            f"{curve} ({factor:.3g}x), and the total gradient norm with it ({gs[0]:.3g} -> {gs[-1]:.3g})."
        ),
        remedies=(lower, *rest),
    )


def _report(
    model: nn.Module,
    twin: nn.Module,
    opt: torch.optim.Optimizer | None,
    facts: ModelFacts,
    monitor: GradWatch,
    probe: _SignalProbe,
    trace: _Trace,
    steps: int,
    inputs: Any,
) -> PreflightReport:
    rows = _rows(probe, trace)
    by_name = {r.name: r for r in rows}
    alerts = [a for a in monitor.alerts if not _transient_zero(a, by_name, facts)]
    label = _optimizer_label(opt) if opt is not None else None
    # Divergence only where the gradients themselves showed nothing: when they did (an oversized init,
    # unnormalised inputs), the monitor's alert already names the cause, ranked by the evidence.
    if label is not None and not any(a.kind in (schema.EXPLODING, schema.NONFINITE) for a in alerts):
        div = _divergence(trace, label, facts)
        if div is not None:
            alerts.append(div)
    order = {r.name: i for i, r in enumerate(rows)}
    alerts.sort(key=lambda a: (a.step, _CAUSE_RANK.get(a.kind, len(_CAUSE_RANK)), order.get(a.layer or "", len(order))))
    x = _first_float(inputs)
    return PreflightReport(
        model=type(model).__name__,
        steps=steps,
        batch_size=_batch_size(inputs),
        input_rms=_rms(x) if x is not None else None,
        losses=trace.losses,
        layers=rows,
        alerts=alerts,
        optimizer=label,
    )


def preflight(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = 3,
    clip: Clipper | None = None,
) -> PreflightReport:
    """Check a model on one batch before training: the pathologies gradwatch would raise, at step 0.

    Runs ``steps`` forward/backward steps (and, with ``optimizer``, optimizer steps) on a deep copy
    of ``model`` with a :class:`~gradwatch.GradWatch` watching the copy (every step a logging step,
    activation tracking on, recurrent modules profiled across time, detectors reporting a condition
    on first sight -- see the module docstring). ``model``, ``optimizer``, ``clip`` and every
    random-number state (torch CPU and CUDA, ``random``, numpy) are left exactly as they were; the
    copy costs one more model (and optimizer state) in memory while it runs.

    How ``batch`` is fed:

    ============================  ===========================================  ==========================
    ``batch``                     with ``loss_fn``                             without ``loss_fn``
    ============================  ===========================================  ==========================
    a ``Tensor`` ``x``            ``loss_fn(model(x), x)``                     ``model(x)`` gives the loss
    ``(*inputs, target)`` tuple   ``loss_fn(model(*inputs), target)``          ``model(*batch)`` gives it
    or list
    a dict                        ``loss_fn(model(**batch), batch)``           ``model(**batch)`` gives it
    ============================  ===========================================  ==========================

    "Gives the loss": the output is a scalar tensor, or has a scalar ``.loss`` (Hugging Face
    outputs), or is a dict with a scalar ``"loss"``.

    Args:
        model: the model, as it will start training (on its device; the batch on the same).
        batch: one training batch, as above.
        loss_fn: ``loss_fn(output, target) -> scalar loss``; ``None`` when the model returns its loss.
        optimizer: the optimizer training will use: pre-flight then takes real steps with a copy of
            it, reports each layer's update-to-weight ratio of the first step and checks for divergence.
        steps: forward/backward steps on the copy.
        clip: the clipping strategy training will use (applied on the copy's steps).

    Returns:
        A :class:`~gradwatch.preflight_report.PreflightReport`: ``report.ok``, ``report.alerts``,
        ``report.layers``; ``print(report)`` shows the worst layers and the findings.

    Raises:
        TypeError: ``model`` is not a module, ``batch`` of an unsupported type, a bad ``optimizer``.
        ValueError: ``steps`` < 1, a tuple batch too short, no loss to back-propagate.

    Example::

        report = gw.preflight(model, (x, y), nn.functional.cross_entropy, optimizer=opt)
        print(report)
        assert report.ok, report.kinds
    """
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be None or a callable loss_fn(output, target); got {loss_fn!r}")
    call = _split_batch(batch, loss_fn is not None)

    def compute_loss(m: nn.Module) -> Tensor:
        output = m(*call.args, **call.kwargs)
        if loss_fn is not None:
            return loss_fn(output, call.target)
        loss = _own_loss(output)
        if loss is None:
            raise ValueError(
                f"`loss_fn` is needed: the model's output ({_describe(output)}) carries no loss (a scalar tensor, "
                "`.loss` or a 'loss' entry); pass loss_fn=..., e.g. nn.functional.cross_entropy"
            )
        return loss

    return run_preflight(model, compute_loss, optimizer=optimizer, steps=steps, clip=clip,
                         inputs=(call.args, call.kwargs))


def preflight_training_step(
    module: nn.Module,
    batch: Any,
    batch_idx: int = 0,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = 3,
    clip: Clipper | None = None,
) -> PreflightReport:
    """:func:`preflight` for a LightningModule: the loss is its own ``training_step(batch, batch_idx)``.

    The copy has no Trainer, so ``self.log`` in ``training_step`` logs nothing (Lightning's warning
    about it is silenced), and a ``training_step`` that needs ``self.trainer`` or manual
    optimization cannot run on it: that raises, as any failing forward does.

    Raises:
        ValueError: ``training_step`` returned neither a scalar loss tensor nor a dict with ``"loss"``.
    """

    def compute_loss(m: nn.Module) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "You are trying to `self.log()` but ..." on the Trainer-less copy
            out = m.training_step(batch, batch_idx)  # type: ignore[operator]
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor):
            raise ValueError(f"pre-flight needs training_step to return the loss (a Tensor or a dict with 'loss'); "
                             f"got {_describe(out)}")
        return loss

    return run_preflight(module, compute_loss, optimizer=optimizer, steps=steps, clip=clip, inputs=batch)


def run_callback_preflight(
    trainer: Any,
    module: nn.Module,
    batch: Any,
    batch_idx: int,
    *,
    clip: Clipper | None,
    on_alert: Any,
    printer: Callable[[str], Any] | None,
) -> PreflightReport | None:
    """``GradWatchCallback(preflight=True)``: check the module on its first batch, print, apply ``on_alert``.

    Runs on every rank (a model with synchronised BatchNorm needs all of them in its forward) and
    prints on rank 0. The Trainer's only optimizer is copied along (with several, none is: their
    steps follow the user's own schedule). A pre-flight that cannot run is a warning, never the
    end of the fit; a finding is, with ``on_alert="raise"``.

    Returns:
        The report, or ``None`` when pre-flight could not run.

    Raises:
        GradWatchAlertError: with ``on_alert="raise"`` and a finding.
    """
    if not getattr(module, "automatic_optimization", True):
        warn_user("gradwatch pre-flight skipped: it needs automatic optimization (training_step returning the loss)")
        return None
    optimizers = [getattr(o, "_optimizer", o) for o in getattr(trainer, "optimizers", [])]
    optimizer = optimizers[0] if len(optimizers) == 1 else None
    try:
        report = preflight_training_step(module, batch, batch_idx, optimizer=optimizer, clip=clip)
    except Exception as exc:  # the copy's failure must not end the user's fit
        warn_user(f"gradwatch pre-flight could not run on the first batch ({type(exc).__name__}: {exc}); "
                  "training goes on without it")
        return None
    if getattr(trainer, "is_global_zero", True):
        text = str(report)
        (printer or print)(text)
        log.log(logging.INFO if report.ok else logging.WARNING, "%s", text)
    if report.alerts and on_alert == "raise":
        raise GradWatchAlertError(report.alerts[0])
    if callable(on_alert):
        for alert in report.alerts:
            on_alert(alert)
    return report
