"""A layers x steps heatmap of per-layer gradient norms, readable with hundreds of layers."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from gradwatch import schema


class NormHistory:
    """Bounded per-layer gradient-norm history of the logging steps, for the heatmap.

    Args:
        max_steps: logging steps kept (older columns are dropped).
    """

    def __init__(self, max_steps: int = 500) -> None:
        self.layers: list[str] = []
        self.steps: deque[int] = deque(maxlen=max_steps)
        self.rows: deque[dict[str, float]] = deque(maxlen=max_steps)

    def set_layers(self, layers: list[str]) -> None:
        """Fix the row order (forward order from the monitor's meta record)."""
        self.layers = list(layers)

    def add(self, metrics: dict[str, float], step: int) -> None:
        """Keep the ``grad_norm/<layer>`` values of one logging step."""
        row = schema.per_layer(metrics, schema.GRAD_NORM)
        if not row:
            return
        for name in row:
            if name not in self.layers:
                self.layers.append(name)
        self.steps.append(step)
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.steps)


def render_heatmap(history: NormHistory, title: str = "per-layer gradient norm (log10)") -> Any:
    """Render ``history`` as an RGB ``numpy`` array (rows: layers in forward order; columns: steps).

    Non-finite norms are drawn in red, absent or exactly zero gradients in grey. At most ~40 layer names are
    written on the axis, so the figure stays readable with hundreds of layers.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    n_layers, n_steps = len(history.layers), len(history)
    data = np.full((n_layers, n_steps), np.nan)
    bad = np.zeros((n_layers, n_steps), dtype=bool)
    index = {name: i for i, name in enumerate(history.layers)}
    for j, row in enumerate(history.rows):
        for name, v in row.items():
            if math.isfinite(v) and v > 0:
                data[index[name], j] = math.log10(v)
            elif not math.isfinite(v):
                bad[index[name], j] = True

    height = min(12.0, 2.5 + 0.12 * n_layers)
    fig = Figure(figsize=(10, height), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#cccccc")
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap)
    if bad.any():
        overlay = np.where(bad, 1.0, np.nan)
        ax.imshow(overlay, aspect="auto", interpolation="nearest", cmap=ListedColormap(["#d62728"]))
    steps = list(history.steps)
    xt = np.linspace(0, n_steps - 1, num=min(n_steps, 10)).round().astype(int) if n_steps else []
    ax.set_xticks(list(xt))
    ax.set_xticklabels([str(steps[i]) for i in xt])
    stride = max(1, math.ceil(n_layers / 40))
    yt = list(range(0, n_layers, stride))
    ax.set_yticks(yt)
    ax.set_yticklabels([history.layers[i] for i in yt], fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (input at the top)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="log10 ||g||")
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return rgba[..., :3].copy()
