"""Command line: ``gradwatch demo`` and ``gradwatch report`` (also ``python -m gradwatch``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from gradwatch._format import fmt
from gradwatch.errors import GradWatchWarning

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from gradwatch import __version__
    from gradwatch.reference import SCENARIOS

    p = argparse.ArgumentParser(
        prog="gradwatch",
        description="Watch the gradients of PyTorch models: reference demo and offline reports.",
    )
    p.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,report,bench}")
    sub.required = True

    d = sub.add_parser(
        "demo",
        help="train every reference scenario (pathology and remedy) with gradwatch attached",
        description="Train each reference scenario's pathology and remedies with gradwatch attached, print "
        "what it found, and write one JSONL per run plus report.html into --out.",
    )
    d.add_argument("--scenario", action="append", choices=list(SCENARIOS), metavar="NAME",
                   help=f"run only this scenario (repeatable); one of: {', '.join(SCENARIOS)}")
    d.add_argument("--steps", type=_positive_int, metavar="N",
                   help="optimizer steps per run (default: each scenario's own budget)")
    d.add_argument("--out", default="gradwatch-demo", metavar="DIR",
                   help="output folder (default: gradwatch-demo); the demo's own files in it are replaced")
    d.add_argument("--wandb", action="store_true",
                   help="also log every run to Weights & Biases (offline unless you are logged in)")
    d.add_argument("--no-report", action="store_true", help="do not write report.html")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser(
        "report",
        help="write an HTML report from JSONL runs",
        description="Write one self-contained HTML file (images embedded) from gradwatch JSONL runs.",
    )
    r.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="JSONL files written by gw.sinks.JSONL")
    r.add_argument("-o", "--output", default="report.html", metavar="report.html",
                   help="the HTML file to write (default: report.html)")
    r.add_argument("--png", action="store_true", help="also write each figure as PNG into <output stem>_png/")
    r.add_argument("--title", default="gradwatch report", help="page title")

    from gradwatch.bench.command import DESCRIPTION, add_arguments

    add_arguments(sub.add_parser("bench", help="run the detection benchmark (faulty trainings and healthy controls)",
                                 description=DESCRIPTION))
    return p


class _Progress:
    """A one-line progress bar on a terminal; one line per finished run elsewhere."""

    def __init__(self, stream: TextIO, label: str, enabled: bool) -> None:
        self.stream = stream
        self.label = label
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 28
        filled = int(width * done / max(1, total))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label:<28} [{bar}] {done:>4}/{total} {now - self.t0:5.1f}s")
        self.stream.flush()

    def finish(self, note: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        prefix = "\r" if self.tty else ""
        self.stream.write(f"{prefix}{self.label:<28} {note} ({elapsed:.1f}s){' ' * 24}\n")
        self.stream.flush()


def _wandb_mode() -> str:
    """``"online"`` when the user is logged in to W&B (or set WANDB_MODE), else ``"offline"``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="ignore"):
            return "online"
    except OSError:
        pass
    return "offline"


def format_table(results: Sequence[Any]) -> str:
    """The demo table: scenario, variant, alerts, final loss, layer and time-step ratios, verdict."""
    head = (
        "scenario", "variant", "role", "alerts raised", "final loss", "first/last layer", "first/last time",
        "as expected",
    )
    rows = [head]
    for r in results:
        rows.append(
            (
                r.scenario,
                r.variant,
                r.role,
                ", ".join(r.kinds) or "none",
                fmt(r.final_loss),
                fmt(r.layer_ratio),
                fmt(r.time_ratio),
                "yes" if r.ok else f"NO (expected {r.expect or 'no alert'})",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_findings(results: Sequence[Any]) -> str:
    """Under the table, per pathology: the layer, the figure and the first remedy of its alert.

    The alert shown is the first of the kind the pathology is expected to raise (else its first).
    """
    blocks = []
    for r in results:
        if r.role != "pathology":
            continue
        head = f"{r.scenario}/{r.variant}"
        alert = next((a for a in r.alerts if a.kind == r.expect), r.alerts[0] if r.alerts else None)
        if alert is None:
            blocks.append(f"{head}: no alert (expected {r.expect})")
            continue
        blocks.append(
            "\n".join(
                [
                    f"{head}: {alert.kind} ({alert.severity}) at step {alert.step}",
                    f"  layer:  {alert.layer if alert.layer is not None else 'whole model'}",
                    f"  figure: {alert.message}",
                    f"  remedy: {alert.remedies[0] if alert.remedies else 'none suggested'}",
                ]
            )
        )
    return "\n".join(blocks)


def _demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from gradwatch.reference import SCENARIOS

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"gradwatch demo: error: --out {str(out_dir)!r} exists and is not a folder")
    names = list(dict.fromkeys(args.scenario or SCENARIOS))
    mode = _wandb_mode() if args.wandb else None
    if args.wandb:
        from gradwatch.sinks.wandb import _require_wandb

        _require_wandb()  # ModuleNotFoundError with the install command, before any training
        err.write(f"W&B: logging every run in {mode} mode (project gradwatch-demo)\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    # The reference models are small: one intra-op thread is faster than several, and far faster
    # when other processes share the cores (OpenMP threads then wait on each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = _train_all(args, names, out_dir, mode, err)
    finally:
        torch.set_num_threads(threads)
    return _finish(args, results, out_dir, out, err)


def _train_all(args: argparse.Namespace, names: list[str], out_dir: Path, mode: str | None, err: TextIO) -> list[Any]:
    from gradwatch.reference import SCENARIOS, run_variant

    results = []
    for name in names:
        sc = SCENARIOS[name]
        for v in sc.variants:
            sinks: list[Any] = []
            if args.wandb:
                from gradwatch.sinks import Wandb

                sinks.append(
                    Wandb(
                        chart_every=None,
                        init_kwargs={
                            "project": "gradwatch-demo",
                            "group": sc.name,
                            "name": f"{sc.name}-{v.name}",
                            "mode": mode,
                            "dir": str(out_dir),
                            "config": {"scenario": sc.name, "variant": v.name, "role": v.role},
                        },
                    )
                )
            bar = _Progress(err, f"{sc.name}/{v.name}", not args.no_progress)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # alerts are shown in the table, not as warnings
                res = run_variant(sc, v, steps=args.steps, out_dir=out_dir, sinks=sinks, progress=bar)
            bar.finish(", ".join(res.kinds) or "no alert")
            results.append(res)
    return results


def _finish(args: argparse.Namespace, results: list[Any], out_dir: Path, out: TextIO, err: TextIO) -> int:
    t0 = time.perf_counter()
    train_s = sum(r.seconds for r in results)
    out.write("\n" + format_table(results) + "\n")
    findings = format_findings(results)
    if findings:
        out.write("\n" + findings + "\n")
    if not args.no_report:
        try:
            from gradwatch.report import build_report

            path = build_report([r.jsonl for r in results if r.jsonl is not None], out_dir / "report.html",
                                title="gradwatch demo: each pathology beside its remedy")
            out.write(f"\nreport: {path}\n")
        except ModuleNotFoundError as exc:
            err.write(f"report skipped: {exc}\n")
    out.write(f"runs: {out_dir}/<scenario>-<variant>.jsonl ({len(results)} runs, training {train_s:.1f}s, "
              f"report {time.perf_counter() - t0:.1f}s)\n")
    bad = [r for r in results if not r.ok]
    if bad:
        out.write(f"{len(bad)} run(s) did not behave as expected: "
                  + ", ".join(f"{r.scenario}/{r.variant}" for r in bad) + "\n")
        return 1
    return 0


def _report(args: argparse.Namespace, out: TextIO, err: TextIO, parser: argparse.ArgumentParser) -> int:
    from gradwatch.report import build_report

    for p in args.runs:
        if not Path(p).is_file():
            parser.error(f"run file {p!r} does not exist")
    if Path(args.output).is_dir():
        parser.error(f"-o/--output {args.output!r} is a folder; give an .html file path")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GradWatchWarning)
            path = build_report(args.runs, args.output, png=args.png, title=args.title)
    except ValueError as exc:
        parser.error(str(exc))
    except ModuleNotFoundError as exc:
        parser.exit(1, f"gradwatch report: error: {exc}\n")
    for w in caught:  # e.g. a run whose last line was cut: said plainly, not as "sys:1: GradWatchWarning"
        if issubclass(w.category, GradWatchWarning):
            err.write(f"gradwatch report: warning: {str(w.message).removeprefix('gradwatch: ')}\n")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out.write(f"report: {path}\n")
    if args.png:
        out.write(f"figures: {path.with_name(path.stem + '_png')}\n")
    return 0


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the ``gradwatch`` command line.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).
        stdout: where tables and results go (default: ``sys.stdout``).
        stderr: where progress goes (default: ``sys.stderr``).

    Returns:
        The exit status: 0 on success; 1 when a demo run did not behave as expected; argparse
        exits with 2 on bad arguments.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args, out, err)
    if args.command == "bench":
        from gradwatch.bench.command import run as run_bench

        return run_bench(args, out, err)
    return _report(args, out, err, parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
