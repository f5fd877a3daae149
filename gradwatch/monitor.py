"""GradWatch: owns the hooks and runs one step's trip: collect -> detect -> act -> emit.

The stations live in their own modules: statistics in :mod:`gradwatch.stats`, detection in
:mod:`gradwatch.detectors`, skipping in :mod:`gradwatch.skip` and clipping in
:mod:`gradwatch.clip`, the logging-step readout in :mod:`gradwatch.readout` and
:mod:`gradwatch.metrics`, alerts and their channels in :mod:`gradwatch.emit`. This module holds
the lifecycle (hooks, binding, checkpoints) and the order of the trip.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch import schema
from gradwatch._options import MonitorOptions
from gradwatch.activations import ActivationTracker
from gradwatch.alerts import Alert, AlertLog
from gradwatch.amp import AmpWatch
from gradwatch.clip import Clipper, ClipResult
from gradwatch.desync import DesyncCheck
from gradwatch.detectors import Detector, DetectorContext, Finding, StepEvidence, default_detectors
from gradwatch.distributed import agree_max, fsdp1_message, is_distributed, is_rank_zero
from gradwatch.emit import AlertChannels
from gradwatch.errors import NonFiniteGradientError, warn_user
from gradwatch.evidence import Evidence
from gradwatch.layers import ForwardOrderRecorder, Layer, discover_layers, is_compiling, numel, unwrap_model
from gradwatch.metrics import StepTensors, decode_metrics, register_metrics
from gradwatch.readout import Readout, Values
from gradwatch.remedies import inspect_model, remedies_for
from gradwatch.sinks.base import Sink, SinkSet
from gradwatch.sinks.console import Console
from gradwatch.skip import DEVICE, HOST, DeviceSkip, drop_grads_, supports_device_skip
from gradwatch.stats import Gathered, GradStats, StatsCollector, total_norm
from gradwatch.temporal import RECURRENT_TYPES, TimeProfile, TimeProfiler

# Between weight reads (``param_norm_every``) a total gradient norm that moved by more than this factor
# since the last read has the weights read again at the next logging step. A healthy step changes the
# total gradient norm by well under 2x (spikes aside); an update follows its gradient, so gradients
# 2x larger move the weights 2x further per step, the regime where the last norms known stop being a
# safe scale for the detectors' gradient-to-weight ratios.
WEIGHT_REREAD_FACTOR = 2.0

log = logging.getLogger("gradwatch")


@dataclass
class StepReport:
    """What one :meth:`GradWatch.step` did.

    Attributes:
        step: the optimizer step (from 0).
        skipped: whether the step was skipped for non-finite gradients. ``True``/``False`` when
            gradwatch read the flag on the host (logging steps; every step with optimizers that
            cannot skip on the device). ``None`` when the decision was taken on the device and not
            read (a fused optimizer's non-logging step): a skipped step is then counted in
            ``skipped_steps`` and alerted, with its own step number, at the next logging step.
        alerts: alerts emitted during this step (new or reminders).
        metrics: host values, present on logging steps (``None`` otherwise).
    """

    step: int
    skipped: bool | None = False
    alerts: list[Alert] = field(default_factory=list)
    metrics: dict[str, float] | None = None


def _version() -> str:
    from gradwatch import __version__

    return __version__


def _name(obj: Any) -> str:
    return type(obj).__name__


class GradWatch:
    """Watch the gradients of ``model``: statistics, alerts with remedies, clipping, sinks.

    Call :meth:`step` after ``backward()`` (and after ``scaler.unscale_``), right before
    ``optimizer.step()`` -- with gradient accumulation, once per optimizer step, never per
    micro-batch. Or call :meth:`attach` to run it from the optimizer's step pre-hook.

    Args:
        model: the module to watch.
        detectors: ``"default"``, ``None`` (no detection) or a list of :class:`Detector`.
        clip: a clipping strategy from :mod:`gradwatch.clip`, or ``None``.
        on_nonfinite: ``"skip"`` (weights and optimizer state stay bit-identical: fused optimizers
            skip on the device through ``found_inf``, others get their gradients set to ``None``
            after one host read), ``"warn"``, ``"raise"`` (:class:`NonFiniteGradientError`) or
            ``"ignore"``.
        on_alert: ``"warn"`` (the sinks, a ``logging`` record, and a :class:`GradWatchWarning` when
            no sink prints alerts to the terminal), ``"raise"``
            (:class:`GradWatchAlertError`), ``"ignore"`` (still recorded and sent to sinks), or a
            callable taking the :class:`Alert`.
        sinks: where metrics and alerts go: a sink or a list of sinks; ``None`` means
            ``[gw.sinks.Console()]``.
        log_every: logging period in steps (step 0 is a logging step).
        grad_max_every: period in steps of max |g| (``grad_max/…``), the one logging-step
            statistic that reads every gradient once more: it is computed on the first logging
            step at or after each multiple of ``grad_max_every`` (step 0 included) and left out
            of the other logging steps' records. That pass costs what the per-step gradient-norm
            pass costs (on a GPU microseconds; on a CPU ~7% of a training step, more than all
            else gradwatch does), and max |g| is a figure to read, not an input of the default
            detectors. ``1``: on every logging step.
        param_norm_every: period in steps of the weight reads: the weight norms (``param_norm/…``,
            ``grad_to_param/…``) and the update-ratio sample (``update_ratio/…``, measured at the
            next step and reported in the next record). They are read on the first logging step at
            or after each multiple of ``param_norm_every`` (step 0 included), and at the next logging
            step once the total gradient norm has moved more than ``WEIGHT_REREAD_FACTOR`` (2x) since
            the last read; other records leave the keys out, never carrying a stale value. At the
            default ``log_every=10`` that is every logging step; with ``log_every=1`` every tenth
            step, the age the weight norms the detectors relate gradients to have between logging
            steps at the default (weights move slowly: a healthy step changes them by ~0.1%).
            Reading the weights costs what the gradient-norm pass costs (on a CPU ~5% of a training
            step of a large MLP). ``1``: on every logging step.
        granularity: ``"module"`` (each module owning parameters) or ``"parameter"``.
        track_activations: hook ReLU/sigmoid/tanh modules to detect dead and saturated units.
        track_time: profile the input gradient of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` modules per time
            step on logging steps (``time_grad_ratio/<layer>``, ``time_grad_decay/<layer>``) and
            detect vanishing across time (:class:`~gradwatch.detectors.TimeVanishing`). ``None``
            (default): on when the model has such a module (it costs logging steps only);
            ``False`` turns it off.
        scaler: the loop's ``torch.amp.GradScaler``. Then :meth:`step` divides the statistics (and
            clipping thresholds) by the scale while the gradients are not unscaled yet, and
            inf/NaN gradients are left to the scaler, which skips the step itself: no alert, no
            ``on_nonfinite`` action, counted as ``amp/overflow_steps``; only a run of 16 or more
            consecutive skips (the scale fallen 2^16-fold) is a ``nonfinite`` alert.
        history_size: logging steps kept in :attr:`history`.
        max_alerts: alerts kept in :attr:`alerts`.
        remind_every: steps before a persisting condition is reported again.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an unknown keyword is given.
        ValueError: an option has a value outside its allowed set.

    Example::

        monitor = gw.GradWatch(model, sinks=[gw.sinks.JSONL("runs/grads.jsonl")])
        for x, y in loader:
            loss = criterion(model(x), y)
            loss.backward()
            report = monitor.step(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
        monitor.close()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        detectors: str | Sequence[Detector] | None = "default",
        clip: Clipper | None = None,
        on_nonfinite: str = "skip",
        on_alert: str | Callable[[Alert], Any] = "warn",
        sinks: Sink | Sequence[Sink] | None = None,
        log_every: int = 10,
        grad_max_every: int = 100,
        param_norm_every: int = 10,
        granularity: str = "module",
        track_activations: bool = False,
        track_time: bool | None = None,
        scaler: Any = None,
        history_size: int = 1000,
        max_alerts: int = 1000,
        remind_every: int = 500,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
        opts = MonitorOptions.check(
            detectors=detectors, clip=clip, on_nonfinite=on_nonfinite, on_alert=on_alert, sinks=sinks,
            log_every=log_every, grad_max_every=grad_max_every, param_norm_every=param_norm_every,
            granularity=granularity,
            track_activations=track_activations,
            track_time=track_time, scaler=scaler, history_size=history_size, max_alerts=max_alerts,
            remind_every=remind_every,
        )
        self.options = opts
        model = unwrap_model(model)  # torch.compile / DDP wrappers: watch the module itself, same names
        if opts.detectors == "default":
            self.detectors: list[Detector] = default_detectors()
        else:
            self.detectors = list(opts.detectors or [])
        self.model = model
        self.log_every = opts.log_every
        self.grad_max_every = opts.grad_max_every
        self._max_block: int | None = None  # step // grad_max_every of the last step that computed max |g|
        self.param_norm_every = opts.param_norm_every
        self._norm_block: int | None = None  # step // param_norm_every of the last step that read the weights
        self._norm_total = math.nan  # the total gradient norm at the last step that read the weights
        # After a resume the detectors hold no weight norms: the first logging step reads them, outside the
        # schedule (which the checkpoint restores, so the update-ratio samples fall where they would have).
        self._norms_unknown = False
        self.clip = opts.clip
        self.on_nonfinite = opts.on_nonfinite
        self.on_alert = opts.on_alert
        self.granularity = opts.granularity
        self.track_activations = opts.track_activations
        self.scaler = opts.scaler
        self._amp = AmpWatch(opts.scaler) if opts.scaler is not None else None
        self.sinks = SinkSet([Console()] if opts.sinks is None else opts.sinks)
        self.history: deque[dict[str, float]] = deque(maxlen=opts.history_size)
        self._alert_log = AlertLog(remind_every=opts.remind_every, maxlen=opts.max_alerts)
        self._facts = inspect_model(model)
        self._channels = AlertChannels(
            self.sinks, self._alert_log, opts.on_alert, self._remedies, skip_note=opts.on_nonfinite == "skip"
        )
        self._layers: list[Layer] = discover_layers(model, opts.granularity)
        # Evidence beyond the gradients (input scale hook armed on logging steps, update ratios, loss).
        self._evidence = Evidence(model, self._layers, _armed_for_logging(self))
        if not self._layers:
            self._notice(f"gradwatch: {_name(model)} has no trainable parameters; the monitor will record nothing.")
        self._order = ForwardOrderRecorder(model)
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        self._tracker = ActivationTracker(model, device) if opts.track_activations else None
        recurrent = any(isinstance(m, RECURRENT_TYPES) for m in model.modules())
        self.track_time = recurrent if opts.track_time is None else opts.track_time
        self._time = TimeProfiler(model, device, _armed_for_logging(self)) if self.track_time else None
        self._handles: list[RemovableHandle] = []
        self._device_skip = DeviceSkip()
        self._desync: DesyncCheck | None = None  # cross-rank replica check (bound at the first step)
        self._collector: StatsCollector | None = None
        self._step = 0
        self._skipped = 0  # host-known skips (the device count is in _skipped_t)
        self._closed = False
        self._pending_state: dict[str, Any] | None = None
        self._read_at = -1  # last step whose detector state was read back
        self._attached = 0  # optimizer hooks installed by attach/attach_all
        self._explicit_since_hook = False  # an explicit step() ran since the last hook-driven one
        self._warned: set[str] = set()
        self._checked_optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.skip_mode: str | None = None  # "host" / "device": how the last skip decision was taken

    # ------------------------------------------------------------------ public API
    @property
    def layers(self) -> list[str]:
        """Layer names, in forward order once the first step has run."""
        return [layer.name for layer in self._layers]

    @property
    def alerts(self) -> list[Alert]:
        """Alerts emitted so far (the most recent ``max_alerts``)."""
        return list(self._alert_log.alerts)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (read-only)."""
        return self._closed

    @property
    def step_count(self) -> int:
        """Number of steps taken (the index of the next step)."""
        return self._step

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped for non-finite gradients (reads a device count: a sync)."""
        dev = int(self._skipped_t.item()) if self._collector is not None else 0
        return self._skipped + dev

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run :meth:`step` from ``optimizer``'s step pre-hook.

        Under ``GradScaler.step(optimizer)`` the pre-hook runs after the scaler has unscaled the
        gradients, so statistics see the true values.

        Returns:
            A handle whose ``remove()`` detaches the monitor (also done by :meth:`close`).

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: ``optimizer`` holds none of the model's trainable parameters.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self._check_open()
        self._check_optimizer(optimizer, whole_model=True)
        ref = weakref.ref(self)

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if is_compiling():  # a compiled optimizer.step: run gradwatch eagerly, outside the graph
                return torch.compiler.disable(hook)(opt, args, kwargs)
            monitor = ref()
            if monitor is not None and not monitor._closed:
                monitor._hook_step(opt)

        return self._keep(optimizer.register_step_pre_hook(hook))

    def attach_all(self) -> RemovableHandle:
        """Run :meth:`step` before every optimizer step that updates this model's parameters.

        Uses ``torch.optim.optimizer.register_optimizer_step_pre_hook`` (a global hook) and
        filters optimizers by whether they hold any of the model's parameters.
        """
        self._check_open()
        ref = weakref.ref(self)
        ids = {id(p) for p in self.model.parameters()}
        known: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = weakref.WeakKeyDictionary()

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if is_compiling():  # a compiled optimizer.step: run gradwatch eagerly, outside the graph
                return torch.compiler.disable(hook)(opt, args, kwargs)
            monitor = ref()
            if monitor is None or monitor._closed:
                return
            ours = known.get(opt)
            if ours is None:
                ours = any(id(p) in ids for g in opt.param_groups for p in g["params"])
                known[opt] = ours
            if ours:
                monitor._hook_step(opt)

        from torch.optim.optimizer import register_optimizer_step_pre_hook  # not an attribute of torch.optim

        return self._keep(register_optimizer_step_pre_hook(hook))

    def step(
        self,
        *,
        global_step: int | None = None,
        loss: Tensor | float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> StepReport:
        """Compute statistics, run detectors, apply clip/skip and emit to sinks.

        Call it after ``backward()`` (and ``scaler.unscale_(optimizer)`` under AMP), right before
        ``optimizer.step()``: once per optimizer step, never per accumulated micro-batch.

        Args:
            global_step: the number of this step (a Trainer's global step, after a resume);
                the following steps continue from it. ``None``: one more than the last.
            loss: this step's training loss. A tensor stays on the device (no host read on
                non-logging steps); it is evidence for the diagnosis and the ``loss`` metric.
            optimizer: the optimizer about to step: its AMP stage, its hyper-parameters, and with
                ``on_nonfinite="skip"`` a fused optimizer skips a poisoned step on the device.

        Returns:
            The :class:`StepReport` of this step.

        Raises:
            NonFiniteGradientError: with ``on_nonfinite="raise"`` and NaN/Inf gradients.
            GradWatchAlertError: with ``on_alert="raise"`` when an alert is emitted.
            ValueError: a bad ``global_step``, or an ``optimizer`` holding none of the model's
                trainable parameters.
        """
        if is_compiling():  # called from torch.compile'd code: run eagerly, outside the graph
            return torch.compiler.disable(self.step)(global_step=global_step, loss=loss, optimizer=optimizer)
        self._check_open()
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"`optimizer` must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
            self._check_optimizer(optimizer, whole_model=False)
        _check_loss(loss)
        if self._attached:
            self._explicit_since_hook = True
        return self._run(global_step, loss, optimizer)

    def flush(self) -> list[Alert]:
        """Read and emit what the detectors found since the last logging step (a host sync)."""
        if self._collector is None or self._closed or self._read_at >= self._step - 1:
            return []
        out = Readout(self._stats_device)
        self._register_watchers(out)
        return self._channels.emit(self._evidence.relate(self._collect_findings(out.read())), self.history)

    def close(self) -> None:
        """Remove every hook, emit pending alerts, flush and close the sinks (idempotent)."""
        if self._closed:
            return
        try:
            self.flush()
            self._close_amp()
        finally:
            self._closed = True
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._device_skip.remove()
            self._order.remove()
            if self._tracker is not None:
                self._tracker.remove()
            if self._time is not None:
                self._time.remove()
            self._evidence.remove()
            self.sinks.close()

    def state_dict(self) -> dict[str, Any]:
        """Step counter, detector, clipper and alert state, as plain containers and tensors."""
        bound = self._collector is not None
        return {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "layers": self.layers,
            "detectors": [d.state_dict() for d in self.detectors] if bound else None,
            "clip": self.clip.state_dict() if self.clip is not None else None,
            "amp": self._amp.state_dict() if self._amp is not None and bound else None,
            "alerts": self._alert_log.state_dict(),
            "history": list(self.history),
            # The weight-read schedule (param_norm_every and the early re-read), so a resumed run reads and
            # samples the weights at the steps the uninterrupted one would.
            "weights": {"block": -1 if self._norm_block is None else self._norm_block, "total": self._norm_total},
            "evidence": self._evidence.state_dict() if bound else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, so a resumed run neither re-warms nor re-alerts."""
        self._step = int(state["step"])
        self._skipped = int(state.get("skipped_steps", 0))
        self._alert_log.load_state_dict(state.get("alerts", {}))
        self.history.clear()
        self.history.extend(state.get("history", []))
        weights = state.get("weights")
        if weights is not None:
            block = int(weights["block"])
            self._norm_block = None if block < 0 else block
            self._norm_total = float(weights["total"])
        self._norms_unknown = True
        if self.clip is not None and state.get("clip") is not None:
            self.clip.load_state_dict(state["clip"])
        if self._collector is not None:
            self._skipped_t.zero_()
            self._load_detectors(state)
            self._evidence.load_state_dict(state.get("evidence"))
        else:
            self._pending_state = state

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradWatch({type(self.model).__name__}, layers={len(self._layers)}, log_every={self.log_every}, "
            f"grad_max_every={self.grad_max_every}, param_norm_every={self.param_norm_every}, "
            f"clip={self.clip!r}, on_nonfinite={self.on_nonfinite!r})"
        )

    # ------------------------------------------------------------------ the trip
    def _run(self, global_step: int | None, loss: Tensor | float | None, optimizer: Any) -> StepReport:
        if global_step is not None:
            self._set_step(global_step)
        if self._collector is None:
            self._bind(optimizer)
        assert self._collector is not None
        step = self._step
        report = StepReport(step=step)
        gathered = self._collector.gather()
        if gathered.empty:
            if not self._layers:  # said once at construction: nothing to watch
                return report
            self._notice_once(
                "no_grad",
                f"gradwatch: step() found no gradient on any parameter of {_name(self.model)}; call it after "
                "loss.backward() (and before optimizer.zero_grad()). This step is not counted.",
            )
            return report
        logging_step = step % self.log_every == 0
        inv_scale = self._amp.inv_scale(optimizer) if self._amp is not None else None
        scheduled = logging_step and self._param_norm_due(step)  # this step's weight read is the schedule's
        stats = self._collector.compute(
            gathered, step, full=logging_step, inv_scale=inv_scale,
            grad_max=logging_step and self._grad_max_due(step),
            param_norm=scheduled or (logging_step and self._norms_unknown),
        )
        if stats.param_norm is not None:
            self._norms_unknown = False
        acts = self._tracker.take() if self._tracker is not None else None
        times = self._time.take() if self._time is not None and self._time.names else None
        # With an active GradScaler, inf/NaN gradients are overflow that the scaler skips itself;
        # nulling them here would break it (scaler.step asserts it recorded an inf check).
        amp_owned = self._amp is not None and self._amp.active
        acting = self.on_nonfinite in ("skip", "raise") and not amp_owned
        if acting and not stats.agreed and is_distributed():
            # One tiny collective: every rank sees which layers are non-finite on any rank, so all
            # take the same skip/raise decision and report the same layers (no host read).
            agreed = agree_max(stats.nonfinite)
            stats = replace(stats, nonfinite=agreed > 0, any_nonfinite=stats.any_nonfinite | (agreed.sum() > 0))
        seen = stats
        if amp_owned:
            seen = replace(stats, nonfinite=torch.zeros_like(stats.nonfinite),
                           any_nonfinite=torch.zeros_like(stats.any_nonfinite))
        loss_t = self._loss_tensor(loss)
        ev = StepEvidence(
            stats=seen, step=self._step_t, activations=acts, times=times, loss=loss_t, logging=logging_step,
            **self._evidence.begin(step, loss_t, optimizer, grads=gathered.grads_all),
        )
        for d in self.detectors:
            d.update(ev)
        # At the logging steps that read the weights (``param_norm_every``): sample the weights the update
        # will move. The update-ratio sample is a read of the weights too, on the same period.
        self._evidence.end(step, scheduled)
        if amp_owned:
            assert self._amp is not None
            self._amp.update(stats.any_nonfinite, self._step_t)

        counts: Tensor | None = None
        device_skipped: Tensor | None = None
        if acting and self.on_nonfinite == "skip" and supports_device_skip(optimizer):
            # The fused optimizer skips on the device (found_inf): no read, no sync.
            self.skip_mode = DEVICE
            self._device_skip.arm(optimizer, stats.any_nonfinite)
            self._skipped_t.add_(stats.any_nonfinite.to(torch.float32))
            device_skipped = stats.any_nonfinite
            report.skipped = None
        elif acting:
            self.skip_mode = HOST
            if bool(stats.any_nonfinite):  # the one host sync that skipping needs here
                counts = agree_max(self._collector.nonfinite_counts(gathered))  # rare: max over ranks
                if not stats.full:
                    nonfinite = stats.nonfinite
                    stats = self._collector.compute(gathered, step, full=True, inv_scale=inv_scale)
                    stats = replace(stats, nonfinite=nonfinite | stats.nonfinite)
                logging_step = True
                if self.on_nonfinite == "raise":
                    flags = stats.nonfinite.tolist()  # one read on this rare path
                    bad = [self._layers[i].name for i in reversed(range(len(self._layers))) if flags[i]]
                    self._finish_step()
                    raise NonFiniteGradientError(step, bad)
                report.skipped = True
                self._skipped += 1
                drop_grads_(self._layers)

        clip_result: ClipResult | None = None
        if self.clip is not None and not report.skipped:
            clip_result = self.clip.clip_(gathered, stats)

        if logging_step:
            report.metrics, findings, skipped_now = self._read(
                stats, gathered, clip_result, counts, inv_scale, times, ev.loss, device_skipped
            )
            self._watch_weight_age(report.metrics[schema.GRAD_NORM_TOTAL], scheduled)
            if device_skipped is not None:
                report.skipped = skipped_now
            if self._desync is not None:
                # Every rank, every logging step (the same decision everywhere): one all_gather.
                findings = [*findings, *self._desync.check(step)]
            report.alerts = self._channels.emit(findings, self.history)
        self._finish_step()
        self._channels.raise_if_asked(report.alerts)
        return report

    def _grad_max_due(self, step: int) -> bool:
        """Whether this logging step computes max |g| (see ``grad_max_every``)."""
        block = step // self.grad_max_every
        if block == self._max_block and not getattr(self.clip, "needs_grad_max", False):
            return False
        self._max_block = block
        return True

    def _param_norm_due(self, step: int) -> bool:
        """Whether this logging step reads the weights for their norms (see ``param_norm_every``)."""
        block = step // self.param_norm_every
        if block == self._norm_block:
            return False
        self._norm_block = block
        return True

    def _watch_weight_age(self, total: float, scheduled: bool) -> None:
        """Read the weights again at the next logging step once the gradients have moved fast.

        Between weight reads the detectors relate gradients to the last weight norms known. That is
        sound while updates are small; an update follows its gradient, so once the total gradient norm
        is more than :data:`WEIGHT_REREAD_FACTOR` times (or less than its inverse) what it was at the
        last read, or not finite, the weights may have moved as much and are read at the next logging
        step whatever ``param_norm_every`` says.

        Args:
            total: this logging step's total gradient norm (read back).
            scheduled: whether this step read the weights on the schedule (the reference to compare with).
        """
        if scheduled:
            self._norm_total = total
            return
        ref = self._norm_total
        steady = total == ref or (ref > 0 and 1 / WEIGHT_REREAD_FACTOR <= total / ref <= WEIGHT_REREAD_FACTOR)
        if not steady:  # NaN compares False: non-finite gradients have the weights read too
            self._norm_block = None

    def _read(
        self,
        stats: GradStats,
        gathered: Gathered,
        clip: ClipResult | None,
        counts: Tensor | None,
        inv_scale: Tensor | None,
        times: TimeProfile | None,
        loss: Tensor | None,
        device_skipped: Tensor | None,
    ) -> tuple[dict[str, float], list[Finding], bool]:
        """The logging step's one transfer: metrics and every detector's readout, by name."""
        t = StepTensors(stats=stats, nonfinite_counts=counts, loss=loss, skipped_total=self._skipped_t)
        if clip is not None:
            post = total_norm(gathered, 2.0, stats.total_norm.device)
            if inv_scale is not None:
                post = post * inv_scale.to(post.device)
            t.clip_threshold, t.clip_coef, t.clipped_norm = clip.threshold, clip.coef, post
        if self._amp is not None:
            t.amp = self._amp.metric_tensors()
        if times is not None:
            t.time_log_ratio, t.time_log_decay, t.time_seen = times.log_ratio, times.log_decay, times.seen
        out = Readout(self._stats_device)
        register_metrics(out, t)
        if device_skipped is not None:
            out.add("skip/now", device_skipped)
        self._register_watchers(out)
        out.add_all("ev/", self._evidence.readout())
        values = out.read()
        exact: list[float] | None = None
        if counts is None and not all(v == v and abs(v) != float("inf") for v in values["m/grad_norm"]):
            # Rare path (non-finite values, flag not read before): one more read for exact counts.
            exact = self._collector.nonfinite_counts(gathered).cpu().tolist()  # type: ignore[union-attr]
        m = decode_metrics(
            values, self.layers, stats.present_host,
            time_layers=self._time.names if times is not None and self._time is not None else [],
            skipped_steps=self._skipped, nonfinite_counts=exact,
        )
        ev_values = values.scope("ev/")
        m.update(self._evidence.absorb(
            ev_values, grad_norm=values["m/grad_norm"], present=stats.present_host,
            param_norm=values["m/param_norm"] if "m/param_norm" in values else None,
        ))
        findings = self._evidence.relate(self._collect_findings(values))
        if is_rank_zero():
            self.sinks.metrics(m, stats.step)
        self.history.append({"step": float(stats.step), **m})
        skipped_now = bool(values.scalar("skip/now")) if "skip/now" in values else False
        return m, findings, skipped_now

    def _register_watchers(self, out: Readout) -> None:
        for i, d in enumerate(self.detectors):
            out.add_all(f"d{i}/", d.readout())
        if self._amp is not None:
            out.add_all("amp/", self._amp.readout())

    def _collect_findings(self, values: Values) -> list[Finding]:
        findings: list[Finding] = []
        for i, d in enumerate(self.detectors):
            findings.extend(d.collect(values.scope(f"d{i}/"), self._step))
        if self._amp is not None:
            findings.extend(self._amp.collect(values.scope("amp/"), self._step))
        self._read_at = self._step
        return findings

    def _remedies(self, f: Finding, typical: float | None) -> tuple[str, ...]:
        return remedies_for(
            f.kind, self._facts, typical_norm=typical, source=f.source, evidence=self._evidence.snapshot(f.evidence),
            layers=f.layers or ((f.layer,) if f.layer else ()), step=f.step,
        )

    # ------------------------------------------------------------------ lifecycle internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this GradWatch monitor is closed; create a new one to keep monitoring")

    def _keep(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        self._attached += 1
        return handle

    def _hook_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step pre-hook of :meth:`attach` / :meth:`attach_all`."""
        if self._explicit_since_hook:
            # monitor.step() already ran for this optimizer step: recording it twice would run
            # every statistic and streak at twice the step rate.
            self._explicit_since_hook = False
            self._notice_once(
                "double",
                f"gradwatch: monitor.step() was called explicitly and the monitor is also attached to "
                f"{_name(optimizer)}.step() (gw.watch / attach), so both ran for step {self._step - 1}; the "
                "attached run is ignored. Remove the explicit monitor.step() call (or do not attach).",
            )
            return
        self._run(None, None, optimizer)

    def _check_optimizer(self, optimizer: torch.optim.Optimizer, *, whole_model: bool) -> None:
        """An optimizer must update the watched parameters (once per optimizer)."""
        if optimizer in self._checked_optimizers:
            return
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [p for layer in self._layers for p in layer.params]
        if not params:
            return
        held = sum(id(p) in owned for p in params)
        # An optimizer over this model's frozen parameters only is a training bug, not a wrong argument: the
        # `no_gradient` alert (source "inert") reports it with its remedy.
        frozen_only = held == 0 and any(id(p) in owned for p in self.model.parameters() if not p.requires_grad)
        if held == 0 and not frozen_only:
            raise ValueError(
                f"`optimizer` ({_name(optimizer)}) holds none of the {len(params)} trainable parameters of "
                f"{_name(self.model)}: it would never apply the gradients gradwatch watches. Build it over "
                f"this model's parameters (e.g. {_name(optimizer)}(model.parameters(), ...)) or watch the model "
                "it trains."
            )
        self._checked_optimizers.add(optimizer)
        if whole_model and held < len(params):
            missing = [x.name for x in self._layers if not any(id(p) in owned for p in x.params)]
            shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            self._notice(
                f"gradwatch: {_name(optimizer)} updates {held} of the {len(params)} trainable parameters of "
                f"{_name(self.model)} (not: {shown}); gradwatch reports the gradients of all of them. Watch the "
                "sub-module this optimizer trains, or use gw.watch(model) to follow every optimizer."
            )

    def _notice(self, message: str) -> None:
        """A notice that is not an alert: a warning at the user's code and a log record (rank 0)."""
        if is_rank_zero():
            log.warning(message)
            warn_user(message)

    def _notice_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._notice(message)

    def _set_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`global_step` must be an integer >= 0; got {step!r}")
        if step == self._step:
            return
        self._step = step
        step_t = getattr(self, "_step_t", None)
        if step_t is not None:
            step_t.fill_(float(step))

    def _loss_tensor(self, loss: Tensor | float | None) -> Tensor | None:
        """The loss as a float32 scalar on the statistics' device (no host read)."""
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            return loss.detach().reshape(()).to(self._stats_device, torch.float32)
        return torch.tensor(float(loss), device=self._stats_device)

    def _skip_plan(self, optimizer: Any) -> str | None:
        """How a poisoned step will be skipped with this optimizer (``None``: no skipping)."""
        if self.on_nonfinite != "skip":
            return None
        return DEVICE if supports_device_skip(optimizer) else HOST

    def _bind(self, optimizer: Any = None) -> None:
        if self._order.active:
            self._layers = self._order.finish(self._layers)
        self._collector = StatsCollector(self._layers)
        # One all_gather per logging step when the model has parameters replicated across ranks
        # (DDP, FSDP2's unsharded ones); None in one process. detectors=None turns it off too.
        self._desync = DesyncCheck.for_layers(self._layers) if self.detectors else None
        fsdp1 = fsdp1_message([p for x in self._layers for p in x.params])
        if fsdp1 is not None:
            self._notice(fsdp1)
        dev = self._collector.device
        self._stats_device = dev
        self._evidence.bind(self._layers, dev)
        self._step_t = torch.tensor(float(self._step), device=dev)
        self._skipped_t = torch.zeros((), device=dev)
        act_names = self._tracker.names if self._tracker else []
        ctx = DetectorContext(
            layers=self._layers,
            device=dev,
            numel=torch.tensor([float(numel(x)) for x in self._layers], device=dev),
            weight_layers=[i for i, x in enumerate(self._layers) if x.is_weight_layer],
            activation_names=act_names,
            activation_kinds=self._tracker.kinds if self._tracker else [],
            excluded_activations=self._output_activations(act_names),
            time_layers=self._time.names if self._time is not None else [],
        )
        for d in self.detectors:
            d.bind(ctx)
        if self._amp is not None:
            self._amp.bind(dev)
        bind_clip = getattr(self.clip, "bind", None)
        if callable(bind_clip):
            bind_clip(self._layers)  # e.g. AGC resolves the layer names it leaves out
        if self._pending_state is not None:
            self._load_detectors(self._pending_state)
            self._evidence.load_state_dict(self._pending_state.get("evidence"))
            self._pending_state = None
        if is_rank_zero():
            self.sinks.meta(
                {
                    "version": _version(),
                    "layers": self.layers,
                    "granularity": self.granularity,
                    "log_every": self.log_every,
                    "grad_max_every": self.grad_max_every,
                    "param_norm_every": self.param_norm_every,
                    "clip": repr(self.clip) if self.clip is not None else None,
                    "model": type(self.model).__name__,
                    "on_nonfinite": self.on_nonfinite,
                    # "device": a fused optimizer skips poisoned steps itself (found_inf, no sync);
                    # "host": one flag read per step, gradients set to None.
                    "skip": self._skip_plan(optimizer),
                }
            )

    def _output_activations(self, act_names: list[str]) -> list[bool]:
        # Activations that run after the last weight layer (an output sigmoid) are left out of
        # the saturation check: confident predictions are what they are for.
        order = self._order.order
        weight = [order[x.module_name] for x in self._layers if x.is_weight_layer and x.module_name in order]
        last = max(weight) if weight else None
        return [last is not None and order.get(n, -1) > last for n in act_names]

    def _load_detectors(self, state: dict[str, Any]) -> None:
        saved = state.get("detectors")
        if saved is None:
            return
        for d, s in zip(self.detectors, saved):
            d.load_state_dict(s)
        if self._amp is not None and state.get("amp"):
            self._amp.load_state_dict(state["amp"])
        self._step_t = torch.tensor(float(self._step), device=self._step_t.device)

    def _finish_step(self) -> None:
        self._step += 1
        self._step_t.add_(1.0)

    def _close_amp(self) -> None:
        # Under attach, steps the scaler skips run no pre-hook: a run still going on at the end of
        # training is only visible from how far the scale fell since the last step.
        if self._amp is None or self._collector is None or not self._amp.active:
            return
        self._amp.update(None, self._step_t)
        out = Readout(self._stats_device)
        out.add_all("amp/", self._amp.readout())
        self._channels.emit(self._amp.collect(out.read().scope("amp/"), self._step), self.history)


def _check_loss(loss: Any) -> None:
    if loss is None:
        return
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"`loss` must be a scalar (one element); got a tensor of shape {tuple(loss.shape)}")
        return
    if not isinstance(loss, (int, float)) or isinstance(loss, bool):
        raise ValueError(f"`loss` must be a tensor, a number or None; got {type(loss).__name__}")


def _armed_for_logging(monitor: GradWatch) -> Callable[[], bool]:
    """Whether the coming forward precedes a logging step (weakly bound: hooks keep no monitor alive)."""
    ref = weakref.ref(monitor)

    def armed() -> bool:
        m = ref()
        return m is not None and not m._closed and m._step % m.log_every == 0

    return armed


def watch(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> GradWatch:
    """Create a :class:`GradWatch` and attach it: zero changes to the training loop.

    With ``optimizer`` the monitor runs in that optimizer's step pre-hook; without, before
    every optimizer step that updates one of ``model``'s parameters. The monitor is a context
    manager that closes (removing every hook) on exit.

    Example::

        with gw.watch(model, optimizer, sinks=[gw.sinks.JSONL("grads.jsonl")]) as monitor:
            train(model, optimizer)
    """
    monitor = GradWatch(model, **kwargs)
    try:
        if optimizer is None:
            monitor.attach_all()
        else:
            monitor.attach(optimizer)
    except BaseException:
        monitor.close()
        raise
    return monitor
