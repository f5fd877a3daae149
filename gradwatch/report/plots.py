"""The report's figures, rendered with matplotlib (the optional ``report`` extra) to PNG bytes."""

from __future__ import annotations

import io
import math
from typing import Any

from gradwatch import schema
from gradwatch.report.data import Run, log10

KIND_COLORS = {
    schema.VANISHING: "#1f77b4",
    schema.EXPLODING: "#d62728",
    schema.SPIKE: "#ff7f0e",
    schema.NONFINITE: "#7f0000",
    schema.DEAD: "#7f7f7f",
    schema.SATURATED: "#9467bd",
    schema.ACCUMULATING: "#8c564b",
    schema.NO_GRADIENT: "#bcbd22",
    schema.DESYNC: "#e377c2",
}
NONFINITE_COLOR = "#ff0000"  # non-finite cells and steps: outside the viridis scale, so never read as a value
DPI = 90


def require_matplotlib() -> Any:
    """Import matplotlib with the non-interactive Agg backend.

    Raises:
        ModuleNotFoundError: matplotlib is missing (the message gives the install command).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ModuleNotFoundError(
            "gradwatch report needs matplotlib: pip install 'gradwatch[report]'"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def heatmap_matrix(run: Run) -> tuple[list[str], list[int], list[list[float]]]:
    """Layers (forward order) x logging steps of log10 gradient norm (``nan`` where absent or non-finite)."""
    layers = run.family(schema.GRAD_NORM)
    keys = [schema.metric_key(schema.GRAD_NORM, layer) for layer in layers]
    rows = [[log10(m.get(key, math.nan)) for m in run.metrics] for key in keys]
    return layers, run.steps, rows


def nonfinite_matrix(run: Run) -> list[list[bool]]:
    """Layers (as in :func:`heatmap_matrix`) x logging steps: whether the layer's gradient held Inf/NaN."""
    return [run.nonfinite(layer) for layer in run.family(schema.GRAD_NORM)]


def nonfinite_spans(steps: list[int], flags: list[bool]) -> list[tuple[int, int]]:
    """``(first, last)`` logging steps of each run of consecutive flagged logging steps."""
    spans: list[tuple[int, int]] = []
    last = -2  # index of the last flagged step
    for i, (s, bad) in enumerate(zip(steps, flags)):
        if not bad:
            continue
        if last == i - 1:
            spans[-1] = (spans[-1][0], s)
        else:
            spans.append((s, s))
        last = i
    return spans


def _total_nonfinite(run: Run) -> list[bool]:
    return [
        not math.isfinite(m.get(schema.GRAD_NORM_TOTAL, 0.0)) or m.get(schema.NONFINITE_TOTAL, 0.0) > 0
        for m in run.metrics
    ]


def _trailing_nonfinite(run: Run) -> int:
    """Index of the first logging step from which every step's gradients hold Inf/NaN (``len`` if none)."""
    flags = _total_nonfinite(run)
    first = len(flags)
    while first > 0 and flags[first - 1]:
        first -= 1
    return first


def view_end(run: Run) -> int | None:
    """The last logging step worth drawing, or ``None`` for the whole run.

    A run whose gradients stay Inf/NaN to the end (a divergence, steps skipped from then on) would
    show mostly one colour, the growth squeezed into its first columns. Then the view ends after as
    many non-finite logging steps as there were finite ones before: the growth fills half of it.
    """
    first = _trailing_nonfinite(run)
    if first == 0 or len(run.steps) - first <= first:
        return None
    return run.steps[2 * first - 1]


def _zoom(ax: Any, run: Run) -> None:
    end = view_end(run)
    if end is not None:
        ax.set_xlim(run.steps[0] - 0.5, end + 0.5)
        first = run.steps[_trailing_nonfinite(run)]
        ax.set_xlabel(f"step (Inf/NaN from step {first} to the last, {run.steps[-1]}; shown to {end})")


def _shade_nonfinite(ax: Any, run: Run, label: bool = True) -> None:
    """Shade the logging steps whose gradients held Inf/NaN (their norms cannot be drawn)."""
    for j, (a, b) in enumerate(nonfinite_spans(run.steps, _total_nonfinite(run))):
        ax.axvspan(a - 0.5, b + 0.5, color=NONFINITE_COLOR, alpha=0.15, lw=0,
                   label="non-finite gradients" if label and j == 0 else None)


def _draw_heatmap(ax: Any, run: Run, vmin: float | None = None, vmax: float | None = None) -> Any:
    import numpy as np

    layers, steps, rows = heatmap_matrix(run)
    data = np.array(rows, dtype=float) if rows else np.full((1, max(1, len(steps))), np.nan)
    finite = data[np.isfinite(data)]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else -1.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5) if steps else None
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-6),
                   interpolation="nearest", extent=extent)
    bad = np.array(nonfinite_matrix(run), dtype=bool) if rows else np.zeros_like(data, dtype=bool)
    if bad.any():
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        # Non-finite cells in one colour outside the value scale: the growth before them stays readable.
        ax.imshow(np.ma.masked_where(~bad, np.ones_like(data)), aspect="auto", cmap=ListedColormap([NONFINITE_COLOR]),
                  vmin=0, vmax=1, interpolation="nearest", extent=extent)
        ax.legend(handles=[Patch(color=NONFINITE_COLOR, label="Inf/NaN gradient")], loc="upper right", fontsize=7)
    step_y = max(1, len(layers) // 12)
    ax.set_yticks(range(0, len(layers), step_y))
    ax.set_yticklabels([_short(layers[i]) for i in range(0, len(layers), step_y)], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (forward order)")
    _zoom(ax, run)
    return im


def heatmap(run: Run) -> bytes:
    """Layer x step heatmap of log10 gradient norm."""
    plt = require_matplotlib()
    n = len(run.family(schema.GRAD_NORM))
    fig, ax = plt.subplots(figsize=(7.0, min(6.0, 1.6 + 0.12 * n)))
    im = _draw_heatmap(ax, run)
    fig.colorbar(im, ax=ax, label="log10 ‖g‖")
    ax.set_title(f"{run.name}: log10 gradient norm per layer")
    return _png(fig)


def flow_steps(run: Run, k: int = 3) -> list[int]:
    """Logging steps for the gradient-flow chart: first, middle, last (distinct) with finite gradients."""
    finite = [s for s, m in zip(run.steps, run.metrics) if 0 < m.get(schema.GRAD_NORM_TOTAL, math.nan) < math.inf]
    s = finite or run.steps
    picks = [s[0], s[len(s) // 2], s[-1]] if s else []
    return list(dict.fromkeys(picks))[:k]


def flow(run: Run, steps: list[int] | None = None) -> bytes:
    """The classic gradient-flow chart: mean and max |g| per layer (log scale) at a few steps.

    Mean |g| is the gradient RMS (``‖g‖ / sqrt(numel)``) when the run's layer sizes are known
    (demo runs record them), else the layer's L2 norm.
    """
    plt = require_matplotlib()
    steps = steps or flow_steps(run)
    layers = run.family(schema.GRAD_NORM)
    numel = run.summary.get("numel") or {}
    by_step = dict(zip(run.steps, run.metrics))
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    width = 0.8 / max(1, len(steps))
    cmap = plt.get_cmap("plasma")
    for j, s in enumerate(steps):
        m = by_step.get(s, {})
        color = cmap(0.15 + 0.7 * j / max(1, len(steps) - 1))
        mean = []
        for layer in layers:
            g = m.get(schema.metric_key(schema.GRAD_NORM, layer), math.nan)
            n = numel.get(layer)
            mean.append(g / math.sqrt(n) if n else g)
        gmax = [m.get(schema.metric_key(schema.GRAD_MAX, layer), math.nan) for layer in layers]
        xs = [i + (j - (len(steps) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, [v if 0 < v < math.inf else math.nan for v in gmax], width, color=color, alpha=0.35,
               label=f"max |g|, step {s}")
        ax.bar(xs, [v if 0 < v < math.inf else math.nan for v in mean], width, color=color,
               label=f"{'mean |g| (RMS)' if numel else '‖g‖'}, step {s}")
    ax.set_yscale("log")
    stride = max(1, len(layers) // 16)
    ax.set_xticks(range(0, len(layers), stride))
    ax.set_xticklabels([_short(layers[i], 10) for i in range(0, len(layers), stride)], rotation=60, fontsize=7)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("|g|")
    ax.set_title(f"{run.name}: gradient flow")
    ax.legend(fontsize=6, ncol=2)
    return _png(fig)


def total(run: Run) -> bytes:
    """Total gradient norm over time (log scale), clip thresholds, post-clip norm, alert markers."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.0, 3.0))
    xs, ys = run.series(schema.GRAD_NORM_TOTAL)
    ax.plot(xs, [y if y > 0 and math.isfinite(y) else math.nan for y in ys], color="black", lw=1.4,
            marker="." if len(xs) <= 30 else None, label="total ‖g‖ (pre-clip)")
    _shade_nonfinite(ax, run)
    cx, cy = run.series(schema.GRAD_NORM_CLIPPED_TOTAL)
    if cx:
        ax.plot(cx, [y if 0 < y < math.inf else math.nan for y in cy], color="#2ca02c", lw=1.0,
                label="after clipping")
    tx, ty = run.series(schema.CLIP_THRESHOLD)
    if tx:
        ax.plot(tx, ty, color="#2ca02c", ls="--", lw=1.0, label="clip threshold")
    seen: set[str] = set()
    for a in run.alerts:
        kind = str(a.get("kind"))
        ax.axvline(float(a.get("step", 0)), color=KIND_COLORS.get(kind, "#333333"), ls=":", lw=1.2,
                   label=f"alert: {kind}" if kind not in seen else None)
        seen.add(kind)
    if any(y > 0 and math.isfinite(y) for y in ys + cy + ty):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    _zoom(ax, run)
    ax.set_ylabel("‖g‖")
    ax.set_title(f"{run.name}: total gradient norm")
    ax.legend(fontsize=7)
    return _png(fig)


def time_profile(run: Run) -> bytes | None:
    """First/last time-step gradient ratio of recurrent layers over training (``None`` if absent)."""
    layers = run.family(schema.TIME_GRAD_RATIO)
    if not layers:
        return None
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.0, 2.8))
    for layer in layers:
        xs, ys = run.series(schema.metric_key(schema.TIME_GRAD_RATIO, layer))
        ax.plot(xs, [max(y, 1e-30) for y in ys], marker=".", label=layer)
    ax.axhline(1e-8, color=KIND_COLORS["vanishing"], ls="--", lw=1, label="vanishing threshold (1e-8)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("‖dL/dx_first‖ / ‖dL/dx_last‖")
    ax.set_title(f"{run.name}: gradient across time")
    ax.legend(fontsize=7)
    return _png(fig)


def compare(runs: list[Run]) -> bytes:
    """Runs side by side: heatmaps (shared colour scale) over the total norms."""
    plt = require_matplotlib()
    mats = [v for r in runs for row in heatmap_matrix(r)[2] for v in row if math.isfinite(v)]
    vmin, vmax = (min(mats), max(mats)) if mats else (-1.0, 1.0)
    n = len(runs)
    fig, axes = plt.subplots(2, n, figsize=(3.3 * n + 0.8, 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]}, layout="constrained")
    im = None
    for j, r in enumerate(runs):
        im = _draw_heatmap(axes[0][j], r, vmin, vmax)
        kinds = ", ".join(dict.fromkeys(str(a.get("kind")) for a in r.alerts)) or "no alert"
        role = f" ({r.role})" if r.role else ""
        axes[0][j].set_title(f"{r.summary.get('variant', r.name)}{role}\n{kinds}", fontsize=9)
        if j:
            axes[0][j].set_ylabel("")
        xs, ys = r.series(schema.GRAD_NORM_TOTAL)
        ax = axes[1][j]
        ax.plot(xs, [y if y > 0 and math.isfinite(y) else math.nan for y in ys], color="black", lw=1.2,
                marker="." if len(xs) <= 30 else None)
        _shade_nonfinite(ax, r, label=False)
        if any(y > 0 and math.isfinite(y) for y in ys):
            ax.set_yscale("log")
        for a in r.alerts:
            ax.axvline(float(a.get("step", 0)), color=KIND_COLORS.get(str(a.get("kind")), "#333"), ls=":", lw=1)
        ax.set_xlabel("step")
        _zoom(ax, r)
        if not j:
            ax.set_ylabel("total ‖g‖")
    if im is not None:
        fig.colorbar(im, ax=[axes[0][j] for j in range(n)], label="log10 ‖g‖", shrink=0.9)
    return _png(fig)


def compare_time(runs: list[Run]) -> bytes | None:
    """First/last time-step gradient ratio of several runs on one chart (``None`` if none has it)."""
    curves = [(r, layer) for r in runs for layer in r.family(schema.TIME_GRAD_RATIO)]
    if not curves:
        return None
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.0, 3.0))
    for r, layer in curves:
        xs, ys = r.series(schema.metric_key(schema.TIME_GRAD_RATIO, layer))
        label = str(r.summary.get("variant", r.name)) + (f" ({layer})" if len(curves) > len(runs) else "")
        ax.plot(xs, [max(y, 1e-30) for y in ys], marker=".", label=label)
    ax.axhline(1e-8, color=KIND_COLORS["vanishing"], ls="--", lw=1, label="vanishing threshold (1e-8)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("‖dL/dx_first‖ / ‖dL/dx_last‖")
    ax.set_title("gradient reaching the first time step, relative to the last")
    ax.legend(fontsize=7)
    return _png(fig)
