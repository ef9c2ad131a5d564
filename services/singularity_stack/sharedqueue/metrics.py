"""Prometheus metrics of message handling, shared by every consumer in a process."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES = Counter(
    "singularity_queue_messages_total", "Messages settled by consumers, by queue and outcome", ["queue", "outcome"]
)
BATCH_SECONDS = Histogram(
    "singularity_queue_batch_seconds", "Time to settle one batch read from a queue (parse, handle, commit)", ["queue"]
)
