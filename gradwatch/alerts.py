"""The :class:`Alert` record and the de-duplication that decides which alerts are emitted."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gradwatch.schema import Severity

__all__ = ["Alert", "AlertLog", "Severity"]


@dataclass(frozen=True)
class Alert:
    """One finding about the gradients, with the remedies that fit this model.

    Attributes:
        kind: one of :data:`gradwatch.schema.ALERT_KINDS` (the built-in kinds: ``"vanishing"``,
            ``"exploding"``, ``"spike"``, ``"nonfinite"``, ``"dead"``, ``"saturated"``, ``"accumulating"``,
            ``"no_gradient"``, ``"desync"``), or the kind a custom detector names. Not validated, so a
            custom detector can add kinds.
        step: optimizer step (from 0) at which the condition was established.
        layer: qualified name of the layer concerned, or ``None`` for a model-wide finding.
        value: the figure that triggered the alert (its meaning is given in ``message``).
        threshold: the threshold ``value`` crossed.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: one readable sentence with the layer and the figure.
        remedies: ranked fixes, specific to this model (they name modules and the fix).
    """

    kind: str
    step: int
    layer: str | None
    value: float
    threshold: float
    severity: Severity
    message: str
    remedies: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict of the fields (``remedies`` as a list)."""
        d = asdict(self)
        d["remedies"] = list(self.remedies)
        return d


class AlertLog:
    """Bounded record of alerts with de-duplication of persisting conditions.

    A condition is identified by its ``kind``: the depth profile and the per-layer ratio may both
    see the same vanishing gradients, and the user needs one alert, not two. The first
    occurrence is emitted; later ones of that kind are suppressed until ``remind_every`` steps
    have passed, when one reminder is emitted that says how often the condition was seen
    meanwhile. W&B rate-limits identical alert titles, so this is what decides what reaches it.
    """

    def __init__(self, remind_every: int = 500, maxlen: int = 1000) -> None:
        self.remind_every = remind_every
        self.alerts: deque[Alert] = deque(maxlen=maxlen)
        self._last_emitted: dict[tuple[str, str], int] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._last_seen: dict[tuple[str, str], int] = {}

    def admit(self, alert: Alert) -> Alert | None:
        """Return the alert to emit (possibly reworded as a reminder) or ``None`` to suppress it.

        De-duplication is per kind.
        """
        key = (alert.kind, "")
        last = self._last_emitted.get(key)
        if last is not None and alert.step - last < self.remind_every:
            # Count steps, not findings: two checks seeing one condition at one step count once.
            if self._last_seen.get(key) != alert.step:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
            self._last_seen[key] = alert.step
            return None
        seen = self._suppressed.pop(key, 0)
        if last is not None:
            alert = replace(
                alert,
                message=f"{alert.message} (still present: seen {seen} more time(s) since step {last})",
            )
        self._last_emitted[key] = alert.step
        self._last_seen[key] = alert.step
        self.alerts.append(alert)
        return alert

    def state_dict(self) -> dict[str, Any]:
        """Plain-dict state (for checkpoints)."""
        return {
            "last_emitted": [[k[0], k[1], v] for k, v in self._last_emitted.items()],
            "suppressed": [[k[0], k[1], v] for k, v in self._suppressed.items()],
            "last_seen": [[k[0], k[1], v] for k, v in self._last_seen.items()],
            "alerts": [a.to_dict() for a in self.alerts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._last_emitted = {(k, s): int(v) for k, s, v in state.get("last_emitted", [])}
        self._suppressed = {(k, s): int(v) for k, s, v in state.get("suppressed", [])}
        self._last_seen = {(k, s): int(v) for k, s, v in state.get("last_seen", [])}
        self.alerts.clear()
        for d in state.get("alerts", []):
            self.alerts.append(Alert(**{**d, "remedies": tuple(d["remedies"])}))
