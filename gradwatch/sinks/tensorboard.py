"""TensorBoard sink: scalars with ``add_scalar``, alerts with ``add_text``, optional histograms."""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

from gradwatch import schema
from gradwatch._checks import check_int
from gradwatch.alerts import Alert
from gradwatch.distributed import is_rank_zero
from gradwatch.sinks._text import alert_markdown

ALERT_TAG = "gradwatch/alerts"
META_TAG = "gradwatch/meta"
HISTOGRAM_FAMILIES = (schema.GRAD_NORM, schema.GRAD_TO_PARAM)


def _require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ModuleNotFoundError(
            "gw.sinks.TensorBoard needs the `tensorboard` package, which is not installed. "
            "Install it with `pip install tensorboard` (or `pip install 'gradwatch[tensorboard]'`)."
        )


class TensorBoard:
    """Write metrics and alerts to TensorBoard event files.

    * Every metric is a scalar (``add_scalar(key, value, step)``), tags as in the metric keys:
      ``grad_norm/total``, ``grad_norm/<layer>``, ``grad_max/<layer>``, ``clip/coef``, ...
    * Every alert is a Markdown text entry under ``gradwatch/alerts`` at the alert's step, with
      the message, figure and ranked remedies.
    * With ``histograms=True``, every ``histogram_every`` steps, one histogram per family
      (``layers/grad_norm_log10``, ``layers/grad_to_param_log10``) of the log10 per-layer values:
      where the layers' gradients sit, readable with hundreds of layers.

    The writer is created lazily, on rank 0 only.

    Args:
        log_dir: folder of the event files (``None``: ``SummaryWriter``'s default ``runs/<date>_<host>``).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` (flushed, not closed, at close).
        histograms: also write the per-layer histograms.
        histogram_every: steps between two histograms.

    Raises:
        ModuleNotFoundError: ``tensorboard`` is not installed (with the install command).
        ValueError: both ``log_dir`` and ``writer`` are given, or an option is out of range.

    Example::

        monitor = gw.GradWatch(model, sinks=[gw.sinks.TensorBoard("runs/exp1")])
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        *,
        histograms: bool = False,
        histogram_every: int = 100,
    ) -> None:
        _require_tensorboard()
        if log_dir is not None and writer is not None:
            raise ValueError("give either `log_dir` or `writer`, not both (the writer already has its log_dir)")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ValueError(f"`writer` must be a torch.utils.tensorboard.SummaryWriter; got {type(writer).__name__}")
        check_int("histogram_every", histogram_every, 1)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.histograms = bool(histograms)
        self.histogram_every = histogram_every
        self._writer = writer
        self._owns_writer = writer is None
        self._last_hist: int | None = None
        self._closed = False

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` (created at first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def _active(self) -> bool:
        return not self._closed and is_rank_zero()

    def log_meta(self, meta: dict[str, Any]) -> None:
        """Write the configuration and the layer list as a text entry."""
        if not self._active():
            return
        layers = meta.get("layers", [])
        cfg = "\n".join(f"- {k}: `{v}`" for k, v in meta.items() if k != "layers")
        self.writer.add_text(META_TAG, f"{cfg}\n- layers ({len(layers)}): " + ", ".join(f"`{x}`" for x in layers), 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """``add_scalar`` every metric; histograms every ``histogram_every`` steps."""
        if not self._active():
            return
        w = self.writer
        for key, value in metrics.items():
            w.add_scalar(key, value, global_step=step)
        if self.histograms and (self._last_hist is None or step - self._last_hist >= self.histogram_every):
            self._last_hist = step
            self._histograms(metrics, step)

    def log_alert(self, alert: Alert) -> None:
        """Write the alert as Markdown text at its step."""
        if not self._active():
            return
        self.writer.add_text(ALERT_TAG, alert_markdown(alert), global_step=alert.step)

    def close(self) -> None:
        """Flush; close the writer if the sink created it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.flush()
            if self._owns_writer:
                self._writer.close()

    def _histograms(self, metrics: dict[str, float], step: int) -> None:
        import numpy as np  # a tensorboard dependency; the sink itself needs no torch tensor

        for family in HISTOGRAM_FAMILIES:
            vals = [math.log10(v) for v in schema.per_layer(metrics, family).values() if math.isfinite(v) and v > 0]
            if vals:
                self.writer.add_histogram(f"layers/{family}_log10", np.asarray(vals, dtype=np.float64), step)

    def __repr__(self) -> str:
        return f"TensorBoard(log_dir={self.log_dir!r}, histograms={self.histograms})"
