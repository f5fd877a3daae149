"""Weights & Biases sink: metrics with ``run.log``, alerts with ``run.alert``, a per-layer heatmap."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Any

from gradwatch._checks import check_choice, check_int
from gradwatch.alerts import Alert
from gradwatch.distributed import is_rank_zero
from gradwatch.errors import GradWatchWarning
from gradwatch.sinks._heatmap import NormHistory, render_heatmap
from gradwatch.sinks._text import TITLE_MAX, alert_text, alert_title

log = logging.getLogger("gradwatch")

ALERT_LEVELS = ("INFO", "WARN", "ERROR")
_SEVERITY_LEVEL = {"info": "INFO", "warning": "WARN", "error": "ERROR"}
TABLE_COLUMNS = ["step", "kind", "severity", "layer", "value", "threshold", "message", "remedies"]
HEATMAP_KEY = "gradwatch/grad_norm_heatmap"
TABLE_KEY = "gradwatch/alerts"


def _require_wandb() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise ModuleNotFoundError(
            "gw.sinks.Wandb needs the `wandb` package, which is not installed. "
            "Install it with `pip install wandb` (or `pip install 'gradwatch[wandb]'`)."
        )


class Wandb:
    """Send metrics, alerts and a per-layer gradient-norm chart to a Weights & Biases run.

    * Metrics go to ``run.log`` together with ``gradwatch/step`` (the optimizer step), which is
      declared as their x-axis with ``run.define_metric``, so gradwatch never fights over W&B's
      own ``_step`` with the rest of your logging.
    * Each alert at or above ``alert_level`` becomes ``run.alert(title, text, level)``: a title
      under 64 characters such as ``"gradwatch: vanishing gradients in encoder.3"``, and a text
      with the message, step, figure and ranked remedies. W&B rate-limits identical titles
      (``wait_duration``); gradwatch's own de-duplication already decided which alerts to send,
      so the wait is kept short; two alerts with the same title at the same step get a number
      (``"... in net.0 (2)"``) so that W&B keeps both. Every alert is also a row of the ``gradwatch/alerts`` table
      logged when the sink closes.
    * Every ``chart_every`` steps (and at close) a heatmap image of log10 per-layer gradient
      norms over the logging steps (``gradwatch/grad_norm_heatmap``): one pixel row per layer, so
      it stays readable with hundreds of layers. Needs matplotlib; without it the chart is
      skipped with one warning.

    Works offline (``WANDB_MODE=offline`` or ``wandb.init(mode="offline")``); sync later with
    ``wandb sync <run dir>``. Only rank 0 talks to W&B.

    Args:
        run: a ``wandb`` run, or a function returning one (called at the first record). ``None``:
            the active run (``wandb.run``) when the first record arrives, or a new one from
            ``wandb.init(**init_kwargs)`` that the sink finishes at close.
        alerts: send alerts with ``run.alert``.
        alert_level: the lowest level sent as a W&B alert: ``"INFO"``, ``"WARN"`` or ``"ERROR"``
            (gradwatch severities ``info``/``warning``/``error`` map to them).
        metrics: log the scalar metrics with ``run.log``. ``False`` when another logger already
            sends them (Lightning's ``WandbLogger``); the chart and the table are still logged.
        chart_every: steps between two heatmaps (``None``: only at close; ``0``: no heatmap). One
            render takes ~0.3-0.5 s of CPU (matplotlib), hence the low default rate.
        chart_history: logging steps the heatmap shows (the most recent).
        table: log the table of alerts at close.
        step_key: the x-axis key logged with every record.
        wait_duration: seconds W&B waits before accepting another alert with the same title.
        init_kwargs: arguments for ``wandb.init`` when the sink starts the run itself.

    Raises:
        ModuleNotFoundError: ``wandb`` is not installed (with the install command).
        ValueError: an option is outside its allowed values.

    Example::

        run = wandb.init(project="my-project", mode="offline")
        monitor = gw.GradWatch(model, sinks=[gw.sinks.Wandb(run)])
    """

    def __init__(
        self,
        run: Any = None,
        alerts: bool = True,
        alert_level: str = "WARN",
        *,
        metrics: bool = True,
        chart_every: int | None = 1000,
        chart_history: int = 500,
        table: bool = True,
        step_key: str = "gradwatch/step",
        wait_duration: float = 1.0,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _require_wandb()
        level = alert_level.upper() if isinstance(alert_level, str) else getattr(alert_level, "value", alert_level)
        check_choice("alert_level", level, ALERT_LEVELS)
        if chart_every is not None:
            check_int("chart_every", chart_every, 0)
        check_int("chart_history", chart_history, 1)
        if not isinstance(wait_duration, (int, float)) or isinstance(wait_duration, bool) or wait_duration <= 0:
            raise ValueError(f"`wait_duration` must be a number of seconds > 0; got {wait_duration!r}")
        if not isinstance(step_key, str) or not step_key:
            raise ValueError(f"`step_key` must be a non-empty string; got {step_key!r}")
        self._run_arg = run
        self.alerts = bool(alerts)
        self.alert_level = level
        self.metrics = bool(metrics)
        self.chart_every = chart_every
        self.table = bool(table)
        self.step_key = step_key
        self.wait_duration = float(wait_duration)
        self.init_kwargs = dict(init_kwargs or {})
        self._run: Any = None
        self._owns_run = False
        self._defined: set[str] = set()
        self._history = NormHistory(chart_history)
        self._logged_alerts: list[Alert] = []
        self._titles: dict[tuple[str, int], int] = {}
        self._last_chart: int | None = None
        self._last_step: int | None = None
        self._chart_ok = chart_every != 0
        self._closed = False

    # ------------------------------------------------------------------ run
    @property
    def run(self) -> Any:
        """The W&B run in use (started lazily on rank 0)."""
        if self._run is None:
            import wandb

            run = self._run_arg() if callable(self._run_arg) and not hasattr(self._run_arg, "log") else self._run_arg
            if run is None:
                run = wandb.run
            if run is None:
                run = wandb.init(**self.init_kwargs)
                self._owns_run = True
            self._run = run
        return self._run

    def _active(self) -> bool:
        return not self._closed and is_rank_zero()

    def _define(self, keys: list[str]) -> None:
        # Our metrics use the optimizer step as their x-axis (declared once per family). When
        # another logger owns the scalars (metrics=False) it also owns the axes: leave them be.
        if not self.metrics:
            return
        # W&B globs by the key's first segment ("grad_norm/*" also covers "grad_norm/total"), which is
        # W&B's namespace, not gradwatch's family/layer schema: hence a plain split here.
        step_prefix = self.step_key.split("/", 1)[0]
        todo = []
        for k in keys:
            prefix = k.split("/", 1)[0]
            family = prefix + "/*" if "/" in k and prefix != step_prefix else k
            if family not in self._defined and k != self.step_key:
                todo.append(family)
                self._defined.add(family)
        if not todo:
            return
        run = self.run
        if self.step_key not in self._defined:
            run.define_metric(self.step_key, hidden=True)
            self._defined.add(self.step_key)
        for family in todo:
            run.define_metric(family, step_metric=self.step_key)

    # ------------------------------------------------------------------ sink protocol
    def log_meta(self, meta: dict[str, Any]) -> None:
        """Remember the layer order for the heatmap and store the configuration in the run config."""
        if not self._active():
            return
        self._history.set_layers(list(meta.get("layers", [])))
        cfg = {k: v for k, v in meta.items() if k != "layers"}
        cfg["num_layers"] = len(meta.get("layers", []))
        self.run.config.update({"gradwatch": cfg}, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """``run.log`` the metrics (when ``metrics``) and the heatmap every ``chart_every`` steps."""
        if not self._active():
            return
        self._last_step = step
        if self._chart_ok:
            self._history.add(metrics, step)
        if self.metrics:
            self._define(list(metrics))
            self.run.log({**metrics, self.step_key: step})
        if (
            self._chart_ok
            and self.chart_every
            and (self._last_chart is None or step - self._last_chart >= self.chart_every)
        ):
            self._chart(step)

    def log_alert(self, alert: Alert) -> None:
        """Send the alert with ``run.alert`` (at or above ``alert_level``) and keep it for the table."""
        if not self._active():
            return
        self._logged_alerts.append(alert)
        if not self.alerts:
            return
        level = _SEVERITY_LEVEL.get(alert.severity, "WARN")
        if ALERT_LEVELS.index(level) < ALERT_LEVELS.index(self.alert_level):
            return
        title = alert_title(alert)
        # Two conditions can share a title at the same step (e.g. the depth profile and the
        # gradient-to-weight ratio both finding vanishing gradients in one layer); W&B would drop
        # the second as a repeat within ``wait_duration``, so it gets a number.
        if any(step != alert.step for _, step in self._titles):
            self._titles.clear()  # only titles of the current step matter
        key = (title, alert.step)
        n = self._titles.get(key, 0) + 1
        self._titles[key] = n
        if n > 1:
            suffix = f" ({n})"
            title = title[: TITLE_MAX - len(suffix)] + suffix
        self.run.alert(
            title=title,
            text=alert_text(alert),
            level=level,
            wait_duration=self.wait_duration,
        )

    def close(self) -> None:
        """Log the final heatmap and the alerts table; finish the run if the sink started it."""
        if self._closed:
            return
        try:
            if is_rank_zero() and (self._run is not None or self._logged_alerts or len(self._history)):
                if self._chart_ok and len(self._history) and self._last_chart != self._last_step:
                    self._chart(self._last_step if self._last_step is not None else 0)
                if self.table and self._logged_alerts:
                    self._log_table()
        finally:
            self._closed = True
            if self._owns_run and self._run is not None:
                self._run.finish()

    # ------------------------------------------------------------------ internals
    def _chart(self, step: int) -> None:
        self._last_chart = step
        try:
            image = render_heatmap(self._history, title=f"per-layer gradient norm (log10), up to step {step}")
        except ModuleNotFoundError as exc:
            self._chart_ok = False
            msg = f"gradwatch: the W&B gradient-norm heatmap needs matplotlib ({exc}); pip install matplotlib"
            log.warning(msg)
            warnings.warn(msg, GradWatchWarning, stacklevel=3)
            return
        import wandb

        self._define([HEATMAP_KEY])
        self.run.log({HEATMAP_KEY: wandb.Image(image, caption=f"rows: layers (input at top); up to step {step}"),
                      self.step_key: step})

    def _log_table(self) -> None:
        import wandb

        rows = [
            [a.step, a.kind, a.severity, a.layer or "", a.value, a.threshold, a.message, "\n".join(a.remedies)]
            for a in self._logged_alerts
        ]
        self._define([TABLE_KEY])
        step = self._last_step if self._last_step is not None else max(a.step for a in self._logged_alerts)
        self.run.log({TABLE_KEY: wandb.Table(columns=TABLE_COLUMNS, data=rows), self.step_key: step})

    def __repr__(self) -> str:
        return f"Wandb(alerts={self.alerts}, alert_level={self.alert_level!r}, metrics={self.metrics})"

