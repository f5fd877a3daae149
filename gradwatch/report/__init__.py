"""Offline report: one self-contained HTML file (PNG images embedded) from gradwatch JSONL runs.

Per run: a layer x step heatmap of log10 gradient norm (layers in forward order), the classic
gradient-flow bar chart (mean and max |g| per layer at the first, middle and last logging
steps), the total norm over time with clip thresholds and alert markers, the temporal profile
of recurrent layers when present, and the alerts with their remedies. Gradients that held Inf/NaN
are marked (red cells, shaded steps), so a run that diverges shows the growth before it. With several runs,
runs of the same scenario (or all runs, for plain JSONL files) are also shown side by side.

Needs matplotlib (``pip install 'gradwatch[report]'``).

Example::

    from gradwatch.report import build_report
    build_report(["runs/a.jsonl", "runs/b.jsonl"], "report.html", png=True)
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from pathlib import Path

from gradwatch._format import fmt
from gradwatch.report import plots
from gradwatch.report.data import Run, load_run

__all__ = ["SECTIONS", "Run", "build_report", "load_run"]

SECTIONS = ("heatmap", "flow", "total", "alerts")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}h3{font-size:1.05em}
img{max-width:100%;height:auto}.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.alert{border-left:4px solid #d62728;padding:4px 10px;margin:8px 0;background:#fafafa}
.alert.warning{border-color:#ff7f0e}.alert.info{border-color:#1f77b4}.none{color:#2ca02c}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:.9em}
.muted{color:#666;font-size:.9em}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def _fmt(v: object) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt(v)
    return html.escape(str(v))


def _alerts_html(run: Run) -> str:
    if not run.alerts:
        return '<p class="none">No alert.</p>'
    out = []
    for a in run.alerts:
        rem = "".join(f"<li>{html.escape(str(r))}</li>" for r in a.get("remedies") or [])
        sev = html.escape(str(a.get("severity", "warning")))
        out.append(
            f'<div class="alert {sev}"><b>{html.escape(str(a.get("kind")))}</b> at step {_fmt(a.get("step"))}'
            f' ({sev}, layer {html.escape(str(a.get("layer")))}): {html.escape(str(a.get("message")))}'
            + (f"<ol>{rem}</ol>" if rem else "")
            + "</div>"
        )
    return "\n".join(out)


def _summary_html(run: Run) -> str:
    s = run.summary
    if not s:
        return ""
    rows = [
        ("scenario", s.get("title", s.get("scenario"))),
        ("variant", f"{s.get('variant')} ({s.get('role')}): {s.get('summary', '')}"),
        ("final loss", s.get("final_loss")),
        ("first/last layer gradient ratio", s.get("layer_ratio")),
    ]
    if s.get("time_ratio") is not None:
        rows.append(("first/last time-step gradient ratio", s.get("time_ratio")))
    body = "".join(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in rows if v is not None)
    return f"<table>{body}</table>"


def _write_png(png_dir: Path | None, name: str, png: bytes) -> None:
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        (png_dir / f"{name}.png").write_bytes(png)


def build_report(
    runs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    png: bool = False,
    title: str = "gradwatch report",
) -> Path:
    """Write the HTML report of ``runs`` to ``out``.

    Args:
        runs: gradwatch JSONL files (from ``gw.sinks.JSONL`` or ``gradwatch demo``).
        out: the HTML file to write (its folder is created).
        png: also write every figure as a PNG file into ``<out stem>_png/`` beside ``out``.
        title: the page title.

    Returns:
        The path of the HTML file.

    Raises:
        ValueError: ``runs`` is empty, or a file is not a gradwatch JSONL run.
        FileNotFoundError: a run file does not exist.
        ModuleNotFoundError: matplotlib is missing.
    """
    if not runs:
        raise ValueError("`runs` must name at least one JSONL file; got none")
    plots.require_matplotlib()
    loaded = [load_run(p) for p in runs]
    out_path = Path(out)
    png_dir = out_path.with_name(out_path.stem + "_png") if png else None
    names: dict[str, int] = {}

    def uid(run: Run) -> str:
        base = _slug(run.name)
        names[base] = names.get(base, 0) + 1
        return base if names[base] == 1 else f"{base}-{names[base]}"

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    # File names, not paths: the report is shared, and the folder it was built from says nothing.
    parts.append('<p class="muted">' + ", ".join(html.escape(Path(p).name) for p in runs) + "</p>")

    if len(loaded) > 1:
        groups: dict[str, list[Run]] = {}
        for r in loaded:
            groups.setdefault(r.group, []).append(r)
        parts.append('<section data-section="compare"><h2>Side by side</h2>')
        for g, rs in groups.items():
            rs = sorted(rs, key=lambda r: 0 if r.role == "pathology" else 1)
            story = rs[0].summary.get("story")
            parts.append(f"<h3>{html.escape(str(rs[0].summary.get('title', g)))}</h3>")
            if story:
                parts.append(f"<p>{html.escape(str(story))}</p>")
            png_bytes = plots.compare(rs)
            _write_png(png_dir, f"compare-{_slug(g)}", png_bytes)
            parts.append(_img(png_bytes, f"{g}: side by side"))
            time_png = plots.compare_time(rs)
            if time_png is not None:
                _write_png(png_dir, f"compare-{_slug(g)}-time", time_png)
                parts.append(_img(time_png, f"{g}: gradient across time, side by side"))
        parts.append("</section>")

    for r in loaded:
        rid = uid(r)
        parts.append(f'<section class="run" id="{rid}" data-run="{html.escape(r.name)}"><h2>{html.escape(r.name)}</h2>')
        parts.append(_summary_html(r))
        figs = [("heatmap", "Gradient norm per layer and step", plots.heatmap(r)),
                ("flow", "Gradient flow", plots.flow(r)),
                ("total", "Total gradient norm", plots.total(r))]
        tp = plots.time_profile(r)
        if tp is not None:
            figs.append(("time", "Gradient across time (recurrent layers)", tp))
        for key, label, png_bytes in figs:
            _write_png(png_dir, f"{rid}-{key}", png_bytes)
            parts.append(f'<div data-section="{key}"><h3>{label}</h3>{_img(png_bytes, f"{r.name}: {label}")}</div>')
        parts.append(f'<div data-section="alerts"><h3>Alerts and remedies</h3>{_alerts_html(r)}</div>')
        parts.append("</section>")
    parts.append("</body></html>")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path
