"""Regenerate ``docs/clipping.png``: the reference "clipping" scenario without and with each strategy.

Usage::

    python docs/clipping_figure.py            # writes docs/clipping.png and prints a summary table

The scenario (``gradwatch.reference``, "clipping"): a 5-layer He-init ReLU MLP trained with SGD at
a learning rate past its stability limit. Every variant trains on the same batches from the same
seed; gradwatch logs every step.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import gradwatch as gw
from gradwatch.reference.runner import run_variant
from gradwatch.reference.scenarios import Variant, get_scenario

OUT = Path(__file__).with_name("clipping.png")

STRATEGIES = [  # (label, clipper, line style)
    ("no clipping", None, {"color": "black", "lw": 3.0}),
    ("ZScore() (warm-up: no clipping)", lambda: gw.clip.ZScore(), {"color": "tab:red", "lw": 1.5, "ls": "--"}),
    ("Norm(1.0)", lambda: gw.clip.Norm(1.0), {"color": "tab:blue"}),
    ("AGC(0.01)", lambda: gw.clip.AGC(0.01), {"color": "tab:green"}),
    ("ZScore(max_norm=1.0)", lambda: gw.clip.ZScore(max_norm=1.0), {"color": "tab:purple"}),
    ("Percentile(10)", lambda: gw.clip.Percentile(10.0), {"color": "tab:orange"}),
]


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenario = replace(get_scenario("clipping"), log_every=1)
    build = scenario.pathologies[0].build
    fig, (ax_norm, ax_loss) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, clip, style) in enumerate(STRATEGIES):
            variant = Variant(f"v{i}", "pathology" if clip is None else "remedy", build, clip=clip)
            result = run_variant(scenario, variant, out_dir=tmp)
            records = [json.loads(line) for line in Path(result.jsonl).read_text().splitlines()]
            metrics = [r for r in records if r["type"] == "metrics"]
            steps = [r["step"] for r in metrics]
            norms = [r["metrics"]["grad_norm/total"] for r in metrics]
            norms = [v if isinstance(v, float) and math.isfinite(v) else math.nan for v in norms]
            losses = [v if math.isfinite(v) else math.nan for _, v in result.losses]
            style = {"lw": 1.2, **style}
            ax_norm.semilogy(steps, norms, label=label, **style)
            ax_loss.semilogy([s for s, _ in result.losses], losses, label=label, **style)
            skipped = metrics[-1]["metrics"]["skipped_steps"]
            clipped = sum(1 for r in metrics if r["metrics"].get("clip/coef", 1.0) < 1.0)
            rows.append((label, result.final_loss, int(skipped), clipped, result.kinds))
    ax_norm.set_ylabel("total gradient norm (pre-clip)")
    ax_norm.set_title(
        f"{scenario.title}\n(SGD lr {scenario.lr:g}, {scenario.steps} steps; a line ends where the gradients turn "
        "NaN: those steps are skipped)",
        fontsize=10,
    )
    ax_loss.set_ylabel("training loss")
    ax_loss.set_xlabel("optimizer step")
    ax_norm.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")
    print(f"{'strategy':32s} {'final loss':>10s} {'skipped':>8s} {'clipped':>8s}  alerts")
    for label, loss, skipped, clipped, kinds in rows:
        print(f"{label:32s} {loss:10.3g} {skipped:8d} {clipped:8d}  {', '.join(kinds) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
