"""How alerts read in tools with a title/text channel (W&B alerts, TensorBoard text)."""

from __future__ import annotations

from gradwatch import schema
from gradwatch.alerts import Alert

TITLE_MAX = 63  # W&B requires alert titles under 64 characters

_KIND_PHRASE = {
    schema.VANISHING: "vanishing gradients",
    schema.EXPLODING: "exploding gradients",
    schema.SPIKE: "gradient spike",
    schema.NONFINITE: "non-finite gradients",
    schema.DEAD: "dead units",
    schema.SATURATED: "saturated units",
    schema.ACCUMULATING: "accumulating gradients",
    schema.NO_GRADIENT: "no gradient",
    schema.DESYNC: "ranks out of sync",
}


def alert_title(alert: Alert) -> str:
    """A title under 64 characters, e.g. ``"gradwatch: vanishing gradients in encoder.3"``.

    Long layer names keep their tail (the most specific part) behind an ellipsis.
    """
    head = f"gradwatch: {_KIND_PHRASE.get(alert.kind, alert.kind)}"
    if alert.layer is None:
        return head[:TITLE_MAX]
    room = TITLE_MAX - len(head) - len(" in ")
    layer = alert.layer if len(alert.layer) <= room else "..." + alert.layer[-(room - 3):]
    return f"{head} in {layer}"[:TITLE_MAX]


def alert_text(alert: Alert) -> str:
    """Plain-text body: the message, step, figure and the ranked remedies."""
    where = alert.layer if alert.layer is not None else "whole model"
    lines = [
        alert.message,
        "",
        f"Step: {alert.step}",
        f"Layer: {where}",
        f"Value: {alert.value:.4g} (threshold {alert.threshold:.4g})",
        f"Severity: {alert.severity}",
    ]
    if alert.remedies:
        lines += ["", "Remedies, most likely first:"]
        lines += [f"{i}. {r}" for i, r in enumerate(alert.remedies, 1)]
    return "\n".join(lines)


def alert_markdown(alert: Alert) -> str:
    """The alert as a short Markdown block (TensorBoard's text plugin renders Markdown)."""
    where = alert.layer if alert.layer is not None else "whole model"
    lines = [
        f"**{alert.severity.upper()} {alert.kind}** at step {alert.step} in `{where}`",
        "",
        alert.message,
        "",
        f"value {alert.value:.4g}, threshold {alert.threshold:.4g}",
    ]
    if alert.remedies:
        lines += ["", "Remedies, most likely first:", ""]
        lines += [f"{i}. {r}" for i, r in enumerate(alert.remedies, 1)]
    return "\n".join(lines)
