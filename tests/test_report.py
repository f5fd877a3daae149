"""`gradwatch report` on demo runs: every section present, every embedded image a real PNG."""

from __future__ import annotations

import base64
import html
import math
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.cli import main
from gradwatch.report import build_report, load_run
from gradwatch.report.plots import heatmap_matrix
from gradwatch.sinks.jsonl import read_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Collects sections (data-section / data-run attributes) and images, with their nesting."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[dict[str, str]] = []
        self.sections: list[tuple[str | None, str]] = []  # (run, section)
        self.images: list[tuple[str | None, str | None, str]] = []  # (run, section, src)
        self.runs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("section", "div"):
            self.stack.append(a)
            if "data-run" in a:
                self.runs.append(a["data-run"])
            if "data-section" in a:
                self.sections.append((self._run(), a["data-section"]))
        if tag == "img":
            self.images.append((self._run(), self._section(), a["src"]))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("section", "div") and self.stack:
            self.stack.pop()

    def _run(self) -> str | None:
        return next((a["data-run"] for a in reversed(self.stack) if "data-run" in a), None)

    def _section(self) -> str | None:
        return next((a["data-section"] for a in reversed(self.stack) if "data-section" in a), None)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The recurrence demo (RNN and LSTM, 100 steps each) and its report, with --png."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--scenario", "recurrence", "--out", str(out), "--no-report", "--no-progress"]) == 0
    runs = [out / "recurrence-rnn.jsonl", out / "recurrence-lstm.jsonl"]
    report = out / "report.html"
    assert main(["report", *map(str, runs), "-o", str(report), "--png"]) == 0
    page = _Page()
    text = report.read_text(encoding="utf-8")
    page.feed(text)
    return {"out": out, "runs": runs, "report": report, "text": text, "page": page}


def test_every_section_is_there(demo: dict) -> None:
    page: _Page = demo["page"]
    assert page.runs == ["recurrence / rnn", "recurrence / lstm"]
    assert page.sections == [
        (None, "compare"),
        *[(run, s) for run in page.runs for s in ("heatmap", "flow", "total", "time", "alerts")],
    ]


def test_every_image_is_an_embedded_png_of_real_size(demo: dict) -> None:
    page: _Page = demo["page"]
    where = [(run, section) for run, section, _ in page.images]
    assert where == [
        (None, "compare"), (None, "compare"),
        *[(run, s) for run in page.runs for s in ("heatmap", "flow", "total", "time")],
    ]
    for _, _, src in page.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        width, height = _png_size(data)
        assert width >= 300 and height >= 150
        assert len(data) > 8_000


def test_png_files_are_the_embedded_images(demo: dict) -> None:
    png_dir = demo["report"].with_name("report_png")
    names = sorted(p.name for p in png_dir.iterdir())
    assert names == sorted(
        ["compare-recurrence.png", "compare-recurrence-time.png"]
        + [f"recurrence-{v}-{k}.png" for v in ("rnn", "lstm") for k in ("heatmap", "flow", "total", "time")]
    )
    embedded = {base64.b64decode(src.split(",", 1)[1]) for _, _, src in demo["page"].images}
    assert {p.read_bytes() for p in png_dir.iterdir()} == embedded


def test_alert_list_shows_messages_and_remedies(demo: dict) -> None:
    text = demo["text"]
    alerts = [r for r in read_jsonl(demo["runs"][0]) if r["type"] == "alert"]
    assert [a["kind"] for a in alerts if a["kind"] == "vanishing"] == ["vanishing"]
    for a in alerts:
        assert html.escape(a["message"]) in text
        for rem in a["remedies"]:
            assert f"<li>{html.escape(rem)}</li>" in text
    lstm_part = text[text.index('data-run="recurrence / lstm"') :]
    assert '<p class="none">No alert.</p>' in lstm_part


def test_heatmap_rows_are_layers_in_forward_order_with_log10_norms(demo: dict) -> None:
    run = load_run(demo["runs"][0])
    records = read_jsonl(demo["runs"][0])
    meta = records[0]
    metrics = [r for r in records if r["type"] == "metrics"]
    layers, steps, rows = heatmap_matrix(run)
    assert layers == meta["layers"] == ["rnn", "head"]
    assert steps == [r["step"] for r in metrics] == list(range(0, 100, 5))
    for i, layer in enumerate(layers):
        want = [math.log10(r["metrics"][f"grad_norm/{layer}"]) for r in metrics]
        assert rows[i] == pytest.approx(want, rel=1e-12)


def test_plain_jsonl_run_without_summary(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
    path = tmp_path / "plain.jsonl"
    monitor = gw.GradWatch(model, sinks=[gw.sinks.JSONL(path)], log_every=2, clip=gw.clip.Norm(0.01),
                           on_alert="ignore")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        model(torch.randn(8, 4)).square().mean().backward()
        monitor.step()
        opt.step()
        opt.zero_grad()
    monitor.close()
    out = build_report([path], tmp_path / "r.html")
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    assert page.runs == ["plain"]
    assert page.sections == [("plain", s) for s in ("heatmap", "flow", "total", "alerts")]
    run = load_run(path)
    xs, ys = run.series("clip/threshold")
    assert xs == [0, 2, 4] and ys == pytest.approx([0.01] * 3, rel=1e-6)  # float32 on the device


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`runs` must name at least one JSONL file; got none"):
        build_report([], tmp_path / "r.html")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "meta", "layers": []}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"is not a gradwatch JSONL run: it has no 'metrics' record"):
        build_report([bad], tmp_path / "r.html")
    with pytest.raises(FileNotFoundError, match=r"run file .*missing.jsonl' does not exist"):
        build_report([tmp_path / "missing.jsonl"], tmp_path / "r.html")


def _diverging_run(path: Path) -> None:
    """A run that grows x10 per logging step for 5 steps, then holds Inf/NaN gradients (as a crash would)."""
    sink = gw.sinks.JSONL(path)
    sink.log_meta({"layers": ["a", "b"]})
    for s in range(8):
        if s < 5:
            m = {"grad_norm/total": 10.0**s * 2, "grad_norm/a": 10.0**s, "grad_norm/b": 10.0**s, "nonfinite/total": 0.0}
        else:
            m = {"grad_norm/total": math.nan, "grad_norm/a": math.nan, "grad_norm/b": math.inf,
                 "nonfinite/total": 12.0, "nonfinite/a": 4.0, "nonfinite/b": 8.0}
        sink.log_metrics(m, s)
    sink.close()


def _red_pixels(png: bytes, pale: bool = False) -> int:
    """Pixels of pure red (the non-finite cells) or, with ``pale``, of red at 15% over white (the band)."""
    import io

    import matplotlib.image as mpimg
    import numpy as np

    rgb = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    color = [1.0, 0.85, 0.85] if pale else [1.0, 0.0, 0.0]
    return int(np.all(np.abs(rgb - np.array(color)) < 0.02, axis=-1).sum())


def test_a_run_that_goes_nonfinite_shows_the_growth_and_marks_the_nonfinite_cells(tmp_path: Path) -> None:
    from gradwatch.report import plots

    path = tmp_path / "diverged.jsonl"
    _diverging_run(path)
    run = load_run(path)
    layers, steps, rows = heatmap_matrix(run)
    assert layers == ["a", "b"] and steps == list(range(8))
    assert rows[0][:5] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0], abs=1e-12)  # the growth, as log10
    assert all(math.isnan(v) for v in rows[0][5:] + rows[1][5:])
    assert plots.nonfinite_matrix(run) == [[False] * 5 + [True] * 3] * 2
    assert plots.nonfinite_spans(run.steps, [False] * 5 + [True] * 3) == [(5, 7)]
    assert plots.nonfinite_spans([0, 5, 10, 15, 20], [True, False, True, True, False]) == [(0, 0), (10, 15)]
    # The marks are drawn: pure red cells in the heatmap, a red band in the total-norm plot; a finite run has none.
    assert _red_pixels(plots.heatmap(run)) > 1000
    assert _red_pixels(plots.total(run), pale=True) > 1000
    finite = tmp_path / "finite.jsonl"
    sink = gw.sinks.JSONL(finite)
    for s in range(3):
        sink.log_metrics({"grad_norm/total": 1.0, "grad_norm/a": 1.0}, s)
    sink.close()
    assert _red_pixels(plots.heatmap(load_run(finite))) == 0
    assert _red_pixels(plots.total(load_run(finite)), pale=True) == 0
    # Steps 5-7 are non-finite after 5 finite ones: the whole run is drawn. With 20 more non-finite
    # steps, the view ends after as many non-finite steps as finite ones (the growth fills half of it).
    assert plots.view_end(run) is None
    sink = gw.sinks.JSONL(path, append=True)
    for s in range(8, 28):
        sink.log_metrics({"grad_norm/total": math.nan, "grad_norm/a": math.nan, "nonfinite/total": 3.0}, s)
    sink.close()
    assert plots.view_end(load_run(path)) == 9


def test_report_names_runs_by_file_name(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "diverged.jsonl"
    _diverging_run(path)
    out = build_report([path], tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    assert '<p class="muted">diverged.jsonl</p>' in text
    assert str(tmp_path) not in text
