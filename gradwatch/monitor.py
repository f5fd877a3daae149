"""GradWatch: owns the hooks and runs one step's trip: collect -> detect -> act -> emit."""

from __future__ import annotations

import logging
import math
import statistics
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch._checks import check_choice, check_int
from gradwatch.activations import ActivationTracker
from gradwatch.alerts import Alert, AlertLog
from gradwatch.amp import AmpWatch, check_scaler
from gradwatch.clip import Clipper, ClipResult, total_norm
from gradwatch.detectors import Detector, DetectorContext, Finding, default_detectors
from gradwatch.distributed import fsdp1_message, is_distributed
from gradwatch.errors import GradWatchAlertError, GradWatchWarning, NonFiniteGradientError
from gradwatch.layers import (
    GRANULARITIES,
    ForwardOrderRecorder,
    Layer,
    discover_layers,
    is_compiling,
    numel,
    unwrap_model,
)
from gradwatch.remedies import inspect_model, remedies_for
from gradwatch.sinks.base import Sink, SinkSet, is_rank_zero
from gradwatch.sinks.console import Console
from gradwatch.stats import Gathered, GradStats, StatsCollector
from gradwatch.temporal import TimeProfile, TimeProfiler

log = logging.getLogger("gradwatch")

ON_NONFINITE = ("skip", "warn", "raise", "ignore")
ON_ALERT = ("warn", "raise", "ignore")


@dataclass
class StepReport:
    """What one :meth:`GradWatch.step` did.

    Attributes:
        step: the optimizer step (from 0).
        skipped: whether the step was skipped (non-finite gradients set to ``None``).
        alerts: alerts emitted during this step (new or reminders).
        metrics: host values, present on logging steps (``None`` otherwise).
    """

    step: int
    skipped: bool = False
    alerts: list[Alert] = field(default_factory=list)
    metrics: dict[str, float] | None = None


def _version() -> str:
    from gradwatch import __version__

    return __version__


class GradWatch:
    """Watch the gradients of ``model``: statistics, alerts with remedies, clipping, sinks.

    Call :meth:`step` after ``backward()`` (and after ``scaler.unscale_``), right before
    ``optimizer.step()`` -- with gradient accumulation, once per optimizer step, never per
    micro-batch. Or call :meth:`attach` to run it from the optimizer's step pre-hook.

    Args:
        model: the module to watch.
        detectors: ``"default"``, ``None`` (no detection) or a list of :class:`Detector`.
        clip: a clipping strategy from :mod:`gradwatch.clip`, or ``None``.
        on_nonfinite: ``"skip"`` (drop the step's gradients so weights and optimizer state stay
            bit-identical), ``"warn"``, ``"raise"`` (:class:`NonFiniteGradientError`) or ``"ignore"``.
        on_alert: ``"warn"`` (a :class:`GradWatchWarning` and a ``logging`` record), ``"raise"``
            (:class:`GradWatchAlertError`), ``"ignore"`` (still recorded and sent to sinks), or a
            callable taking the :class:`Alert`.
        sinks: where metrics and alerts go; ``None`` means ``[gw.sinks.Console()]``.
        log_every: logging period in steps (step 0 is a logging step).
        granularity: ``"module"`` (each module owning parameters) or ``"parameter"``.
        track_activations: hook ReLU/sigmoid/tanh modules to detect dead and saturated units.
        track_time: profile the input gradient of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` modules per time
            step on logging steps (``time_grad_ratio/<layer>``, ``time_grad_decay/<layer>``) and
            detect vanishing across time (:class:`~gradwatch.detectors.TimeVanishing`).
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
            report = monitor.step()
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
        sinks: Sequence[Sink] | None = None,
        log_every: int = 10,
        granularity: str = "module",
        track_activations: bool = False,
        track_time: bool = False,
        scaler: Any = None,
        history_size: int = 1000,
        max_alerts: int = 1000,
        remind_every: int = 500,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
        model = unwrap_model(model)  # torch.compile / DDP wrappers: watch the module itself, same names
        check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        if not callable(on_alert):
            check_choice("on_alert", on_alert, ON_ALERT)
        check_choice("granularity", granularity, GRANULARITIES)
        self.log_every = check_int("log_every", log_every, 1)
        check_int("history_size", history_size, 1)
        check_int("max_alerts", max_alerts, 1)
        check_int("remind_every", remind_every, 1)
        if not isinstance(track_activations, bool):
            raise ValueError(f"`track_activations` must be True or False; got {track_activations!r}")
        if not isinstance(track_time, bool):
            raise ValueError(f"`track_time` must be True or False; got {track_time!r}")
        if clip is not None and not isinstance(clip, Clipper):
            raise ValueError(
                f"`clip` must be None or a clipping strategy such as gw.clip.Norm(1.0); got {clip!r}"
            )
        check_scaler(scaler)
        if detectors == "default":
            self.detectors: list[Detector] = default_detectors()
        elif detectors is None:
            self.detectors = []
        elif isinstance(detectors, str) or not all(isinstance(d, Detector) for d in detectors):
            raise ValueError(f"`detectors` must be 'default', None or a list of Detector objects; got {detectors!r}")
        else:
            self.detectors = list(detectors)
        if sinks is not None and (isinstance(sinks, (str, bytes)) or not all(isinstance(s, Sink) for s in sinks)):
            raise ValueError(
                "`sinks` must be None or a list of sinks (objects with log_metrics, log_alert and close), "
                f"e.g. [gw.sinks.JSONL('grads.jsonl')]; got {sinks!r}"
            )

        self.model = model
        self.clip = clip
        self.on_nonfinite = on_nonfinite
        self.on_alert = on_alert
        self.granularity = granularity
        self.track_activations = track_activations
        self.scaler = scaler
        self._amp = AmpWatch(scaler) if scaler is not None else None
        self._hook_optimizer: torch.optim.Optimizer | None = None  # set while a step pre-hook runs
        self.sinks = SinkSet([Console()] if sinks is None else sinks)
        self.history: deque[dict[str, float]] = deque(maxlen=history_size)
        self._alert_log = AlertLog(remind_every=remind_every, maxlen=max_alerts)
        self._facts = inspect_model(model)
        self._layers: list[Layer] = discover_layers(model, granularity)
        if not self._layers:
            warnings.warn(
                f"gradwatch: {type(model).__name__} has no trainable parameters; the monitor will record nothing.",
                GradWatchWarning,
                stacklevel=2,
            )
        self._order = ForwardOrderRecorder(model)
        self._tracker: ActivationTracker | None = None
        if track_activations:
            first = next(iter(model.parameters()), None)
            self._tracker = ActivationTracker(model, first.device if first is not None else torch.device("cpu"))
        self._time: TimeProfiler | None = None
        self._times: TimeProfile | None = None
        if track_time:
            first = next(iter(model.parameters()), None)
            self._time = TimeProfiler(
                model, first.device if first is not None else torch.device("cpu"), _armed_for_logging(self)
            )
        self._handles: list[RemovableHandle] = []
        self._collector: StatsCollector | None = None
        self._step = 0
        self._skipped = 0
        self._closed = False
        self._pending_state: dict[str, Any] | None = None
        self._read_at = -1  # last step whose detector state was read back

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
    def step_count(self) -> int:
        """Number of steps taken (the index of the next step)."""
        return self._step

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped for non-finite gradients."""
        return self._skipped

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run :meth:`step` from ``optimizer``'s step pre-hook.

        Under ``GradScaler.step(optimizer)`` the pre-hook runs after the scaler has unscaled the
        gradients, so statistics see the true values.

        Returns:
            A handle whose ``remove()`` detaches the monitor (also done by :meth:`close`).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self._check_open()
        ref = weakref.ref(self)

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if is_compiling():  # a compiled optimizer.step: run gradwatch eagerly, outside the graph
                return torch.compiler.disable(hook)(opt, args, kwargs)
            monitor = ref()
            if monitor is not None and not monitor._closed:
                monitor._step_from(opt)

        handle = optimizer.register_step_pre_hook(hook)
        self._handles.append(handle)
        return handle

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
                monitor._step_from(opt)

        from torch.optim.optimizer import register_optimizer_step_pre_hook  # not an attribute of torch.optim

        handle = register_optimizer_step_pre_hook(hook)
        self._handles.append(handle)
        return handle

    def step(self) -> StepReport:
        """Compute statistics, run detectors, apply clip/skip and emit to sinks.

        Call it after ``backward()`` (and ``scaler.unscale_(optimizer)`` under AMP), right before
        ``optimizer.step()``: once per optimizer step, never per accumulated micro-batch.

        Returns:
            The :class:`StepReport` of this step.

        Raises:
            NonFiniteGradientError: with ``on_nonfinite="raise"`` and NaN/Inf gradients.
            GradWatchAlertError: with ``on_alert="raise"`` when an alert is emitted.
        """
        if is_compiling():  # called from torch.compile'd code: run eagerly, outside the graph
            return torch.compiler.disable(self.step)()
        self._check_open()
        if self._collector is None:
            self._bind()
        assert self._collector is not None
        step = self._step
        report = StepReport(step=step)
        logging_step = step % self.log_every == 0
        gathered = self._collector.gather()
        if gathered.empty:
            self._step += 1
            return report
        inv_scale = self._inv_scale()
        stats = self._collector.compute(gathered, step, full=logging_step, inv_scale=inv_scale)
        acts = self._tracker.take() if self._tracker is not None else None
        self._times = self._time.take() if self._time is not None and self._time.names else None
        # With an active GradScaler, inf/NaN gradients are overflow that the scaler skips itself;
        # nulling them here would break it (scaler.step asserts it recorded an inf check).
        amp_owned = self._amp is not None and self._amp.active
        if self.on_nonfinite in ("skip", "raise") and not amp_owned and not stats.agreed and is_distributed():
            # One tiny collective (when distributed): every rank sees which layers are non-finite on
            # any rank, so all take the same skip/raise decision and report the same layers.
            agreed = self._agree(stats.nonfinite)
            stats = replace(stats, nonfinite=agreed > 0, any_nonfinite=stats.any_nonfinite | (agreed.sum() > 0))
        seen = stats
        if amp_owned:
            seen = replace(stats, nonfinite=torch.zeros_like(stats.nonfinite),
                           any_nonfinite=torch.zeros_like(stats.any_nonfinite))
        for d in self.detectors:
            d.update(seen, self._step_t, acts)
            if self._times is not None and hasattr(d, "update_time"):
                d.update_time(self._times, self._step_t)
        if amp_owned:
            assert self._amp is not None
            self._amp.update(stats.any_nonfinite, self._step_t)

        counts: Tensor | None = None
        if self.on_nonfinite in ("skip", "raise") and not amp_owned:
            # Agreed above, or carried through the all-reduce of sharded statistics.
            if bool(stats.any_nonfinite):  # the one host sync that skipping needs
                counts = self._agree(self._collector.nonfinite_counts(gathered))  # rare: max over ranks
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
                for layer in self._layers:
                    for p in layer.params:
                        p.grad = None

        clip_result: ClipResult | None = None
        if self.clip is not None and not report.skipped:
            clip_result = self.clip.clip_(gathered, stats)

        if logging_step:
            report.metrics, findings = self._read(stats, gathered, clip_result, counts, report.skipped, inv_scale)
            report.alerts = self._emit(findings)
        self._finish_step()
        self._raise_if_asked(report.alerts)
        return report

    def flush(self) -> list[Alert]:
        """Read and emit what the detectors found since the last logging step (a host sync)."""
        if self._collector is None or self._closed or self._read_at >= self._step - 1:
            return []
        values = self._transfer([t for d in self._watchers() for t in d.pending()])
        return self._emit(self._collect(values))

    def _follow_step(self, step: int) -> None:
        """Make the next step carry number ``step`` (a Trainer's ``global_step``, after a resume)."""
        if step == self._step:
            return
        self._step = step
        step_t = getattr(self, "_step_t", None)
        if step_t is not None:
            step_t.fill_(float(step))

    def _step_from(self, optimizer: torch.optim.Optimizer) -> StepReport:
        """Run :meth:`step` for ``optimizer``'s coming step (a pre-hook, Lightning's callback).

        The optimizer's AMP stage is then known.
        """
        self._hook_optimizer = optimizer
        try:
            return self.step()
        finally:
            self._hook_optimizer = None

    def _watchers(self) -> list[Any]:
        """The detectors plus the AMP overflow watch: everything read back at logging steps."""
        return [*self.detectors, self._amp] if self._amp is not None else list(self.detectors)

    def _close_amp(self) -> None:
        # Under attach, steps the scaler skips run no pre-hook: a run still going on at the end of
        # training is only visible from how far the scale fell since the last step.
        if self._amp is None or self._collector is None or not self._amp.active:
            return
        self._amp.update(None, self._step_t)
        values = self._transfer(self._amp.pending())
        self._emit(self._amp.collect(values, self._step))

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
            self._order.remove()
            if self._tracker is not None:
                self._tracker.remove()
            if self._time is not None:
                self._time.remove()
            self.sinks.close()

    def state_dict(self) -> dict[str, Any]:
        """Step counter, detector, clipper and alert state, as plain containers and tensors."""
        return {
            "step": self._step,
            "skipped_steps": self._skipped,
            "layers": self.layers,
            "detectors": [d.state_dict() for d in self.detectors] if self._collector is not None else None,
            "clip": self.clip.state_dict() if self.clip is not None else None,
            "amp": self._amp.state_dict() if self._amp is not None and self._collector is not None else None,
            "alerts": self._alert_log.state_dict(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, so a resumed run neither re-warms nor re-alerts."""
        self._step = int(state["step"])
        self._skipped = int(state.get("skipped_steps", 0))
        self._alert_log.load_state_dict(state.get("alerts", {}))
        self.history.clear()
        self.history.extend(state.get("history", []))
        if self.clip is not None and state.get("clip") is not None:
            self.clip.load_state_dict(state["clip"])
        if self._collector is not None:
            self._load_detectors(state)
        else:
            self._pending_state = state

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradWatch({type(self.model).__name__}, layers={len(self._layers)}, log_every={self.log_every}, "
            f"clip={self.clip!r}, on_nonfinite={self.on_nonfinite!r})"
        )

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this GradWatch monitor is closed; create a new one to keep monitoring")

    def _bind(self) -> None:
        if self._order.active:
            self._layers = self._order.finish(self._layers)
        self._collector = StatsCollector(self._layers)
        fsdp1 = fsdp1_message([p for x in self._layers for p in x.params])
        if fsdp1 is not None and is_rank_zero():
            log.warning(fsdp1)
            warnings.warn(fsdp1, GradWatchWarning, stacklevel=3)
        dev = self._collector.device
        self._step_t = torch.tensor(float(self._step), device=dev)
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
            self._pending_state = None
        if is_rank_zero():
            self.sinks.meta(
                {
                    "version": _version(),
                    "layers": self.layers,
                    "granularity": self.granularity,
                    "log_every": self.log_every,
                    "clip": repr(self.clip) if self.clip is not None else None,
                    "model": type(self.model).__name__,
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

    def _inv_scale(self) -> Tensor | None:
        """``1/scale`` while a known GradScaler's gradients are not unscaled yet (a device tensor)."""
        if self._amp is None:
            return None
        return self._amp.inv_scale(self._hook_optimizer)

    def _agree(self, values: Tensor) -> Tensor:
        """Element-wise max over the ranks (float32), one all-reduce; ``values`` unchanged in one process."""
        if not is_distributed():
            return values
        import torch.distributed as dist

        f = values.to(torch.float32).reshape(-1).clone()
        if dist.get_backend() == "nccl" and f.device.type != "cuda":
            f = f.cuda()
        dist.all_reduce(f, op=dist.ReduceOp.MAX)
        return f.to(values.device).reshape(values.shape)

    def _finish_step(self) -> None:
        self._step += 1
        self._step_t.add_(1.0)

    def _transfer(self, tensors: list[Tensor]) -> list[list[float]]:
        """One device-to-host transfer of many 1-D tensors; returns them as lists."""
        if not tensors:
            return []
        dev = self._step_t.device
        flat = [t.detach().reshape(-1).to(dev, torch.float32) for t in tensors]
        host = torch.cat(flat).cpu().tolist()
        out, i = [], 0
        for t in flat:
            out.append(host[i : i + t.numel()])
            i += t.numel()
        return out

    def _collect(self, values: list[list[float]]) -> list[Finding]:
        findings: list[Finding] = []
        i = 0
        for d in self._watchers():
            k = len(d.pending())
            findings.extend(d.collect(values[i : i + k], self._step))
            i += k
        self._read_at = self._step
        return findings

    def _read(
        self,
        stats: GradStats,
        gathered: Gathered,
        clip: ClipResult | None,
        counts: Tensor | None,
        skipped: bool,
        inv_scale: Tensor | None,
    ) -> tuple[dict[str, float], list[Finding]]:
        assert stats.grad_max is not None and stats.param_norm is not None
        tensors = [stats.grad_norm, stats.grad_max, stats.param_norm, stats.total_norm.reshape(1)]
        if counts is not None:
            tensors.append(counts)
        if clip is not None:
            post = total_norm(gathered, 2.0, stats.total_norm.device)
            if inv_scale is not None:
                post = post * inv_scale.to(post.device)
            tensors += [clip.threshold.reshape(1), clip.coef.reshape(1), post.reshape(1)]
        if self._amp is not None:
            tensors += self._amp.metric_tensors()
        times = self._times
        if times is not None:
            tensors += [times.log_ratio, times.log_decay, times.seen.to(torch.float32)]
        n_fixed = len(tensors)
        pending = [t for d in self._watchers() for t in d.pending()]
        values = self._transfer(tensors + pending)
        gn, gmax, pn, total = values[0], values[1], values[2], values[3][0]
        rest = values[4:n_fixed]
        m: dict[str, float] = {"grad_norm/total": total}
        names = self.layers
        present = stats.present_host
        for i, name in enumerate(names):
            if present[i]:
                m[f"grad_norm/{name}"] = gn[i]
        for i, name in enumerate(names):
            if present[i]:
                m[f"grad_max/{name}"] = gmax[i]
                m[f"param_norm/{name}"] = pn[i]
                m[f"grad_to_param/{name}"] = gn[i] / pn[i] if pn[i] > 0 else float("inf") if gn[i] > 0 else 0.0
        c = rest.pop(0) if counts is not None else None
        if c is None and not all(math.isfinite(v) for v in gn):
            # Rare path (non-finite values under "warn"/"ignore"): one more read for exact counts.
            c = self._collector.nonfinite_counts(gathered).cpu().tolist()  # type: ignore[union-attr]
        m["nonfinite/total"] = float(sum(c)) if c is not None else 0.0
        for i, name in enumerate(names):
            if c is not None and c[i] > 0:
                m[f"nonfinite/{name}"] = c[i]
        m["skipped_steps"] = float(self._skipped)
        if clip is not None:
            m["clip/threshold"], m["clip/coef"], m["grad_norm_clipped/total"] = (rest.pop(0)[0] for _ in range(3))
        if self._amp is not None:
            m["amp/scale"], m["amp/overflow_steps"] = (rest.pop(0)[0] for _ in range(2))
        if times is not None and self._time is not None:
            log_ratio, log_decay, seen_t = (rest.pop(0) for _ in range(3))
            for j, name in enumerate(self._time.names):
                if seen_t[j] > 0:
                    m[f"time_grad_ratio/{name}"] = math.exp(log_ratio[j])
                    m[f"time_grad_decay/{name}"] = math.exp(log_decay[j])
        findings = self._collect(values[n_fixed:])
        if is_rank_zero():
            self.sinks.metrics(m, stats.step)
        self.history.append({"step": float(stats.step), **m})
        return m, findings

    def _typical_norm(self) -> float | None:
        vals = [h["grad_norm/total"] for h in self.history if 0 < h.get("grad_norm/total", 0) < float("inf")]
        return statistics.median(vals) if vals else None

    def _emit(self, findings: list[Finding]) -> list[Alert]:
        emitted: list[Alert] = []
        # A median over the whole history (~0.3 ms at 1000 entries): only when there is an alert to word.
        typical = self._typical_norm() if findings else None
        for f in sorted(findings, key=lambda f: f.step):
            alert = Alert(
                kind=f.kind,
                step=f.step,
                layer=f.layer,
                value=float(f.value),
                threshold=float(f.threshold),
                severity=f.severity,  # type: ignore[arg-type]
                message=f.message,
                remedies=remedies_for(f.kind, self._facts, typical_norm=typical, source=f.source),
            )
            if f.kind == "nonfinite" and f.source == "grad" and self.on_nonfinite == "skip":
                note = " The step was skipped: no weight or optimizer state changed."
                alert = replace(alert, message=alert.message + note)
            admitted = self._alert_log.admit(alert)
            if admitted is None:
                continue
            emitted.append(admitted)
            if is_rank_zero():
                self.sinks.alert(admitted)
                if self.on_alert == "warn":
                    log.warning(admitted.message)
                    warnings.warn(admitted.message, GradWatchWarning, stacklevel=4)
            if callable(self.on_alert):
                self.on_alert(admitted)
        return emitted

    def _raise_if_asked(self, alerts: list[Alert]) -> None:
        if self.on_alert == "raise" and alerts:
            raise GradWatchAlertError(alerts[0])


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
    if optimizer is None:
        monitor.attach_all()
    else:
        monitor.attach(optimizer)
    return monitor
