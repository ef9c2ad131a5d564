"""Status conditions as the Kubernetes API conventions define them: pure functions.

`lastTransitionTime` changes only when a condition's status changes, so an unchanged reconcile
produces an identical status (and the controller then writes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

DATABASES = "DatabasesReady"
QUEUE = "QueueReady"
MIGRATIONS = "MigrationsSucceeded"
SERVICES = "ServicesAvailable"
READY = "Ready"
PARTS = (DATABASES, QUEUE, MIGRATIONS, SERVICES)


@dataclass(frozen=True)
class Verdict:
    """What a reconcile found for one condition type."""

    type: str
    ok: bool | None  # None: unknown (not checked yet)
    reason: str
    message: str = ""

    @property
    def status(self) -> str:
        return "Unknown" if self.ok is None else ("True" if self.ok else "False")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    previous: list[dict[str, Any]], verdicts: list[Verdict], generation: int | None, at: str | None = None
) -> list[dict[str, Any]]:
    """The new condition list: one entry per type, keeping lastTransitionTime unless the status changed."""
    at = at or now()
    old = {c.get("type"): c for c in previous or []}
    merged = []
    for verdict in verdicts:
        before = old.get(verdict.type)
        if before is None or before.get("status") != verdict.status:
            transition = at
        else:
            # a condition without a transition time (written by hand, say) gets one now
            transition = before.get("lastTransitionTime") or at
        merged.append(
            {
                "type": verdict.type,
                "status": verdict.status,
                "reason": verdict.reason,
                "message": verdict.message,
                "lastTransitionTime": transition,
                "observedGeneration": generation,
            }
        )
    return merged


def summary(verdicts: list[Verdict]) -> Verdict:
    """`Ready` is True only when every part is; otherwise it names the first part that is not."""
    for verdict in verdicts:
        if verdict.ok is not True:
            return Verdict(READY, False, verdict.reason, f"{verdict.type}: {verdict.message}".strip())
    return Verdict(READY, True, "AllReady", "databases, queues, migrations and services are ready")


def with_summary(verdicts: list[Verdict]) -> list[Verdict]:
    return [*verdicts, summary(verdicts)]


def already_reported(conditions: list[dict[str, Any]], reason: str, message: str) -> bool:
    """Whether a condition the stack shows already reports this failure (same reason and message): a
    failure that persists is reported once, when it starts, not again by every idle reconcile."""
    return any(
        c.get("status") != "True" and c.get("reason") == reason and c.get("message") == message for c in conditions
    )
