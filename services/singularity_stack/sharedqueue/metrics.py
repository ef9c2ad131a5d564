"""Prometheus metrics of message handling, shared by every consumer in a process."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES = Counter(
    "singularity_queue_messages_total", "Messages settled by consumers, by queue and outcome", ["queue", "outcome"]
)
HANDLE_SECONDS = Histogram(
    "singularity_queue_handle_seconds", "Time to settle one message (parse, handle, commit)", ["queue"]
)
