"""Prometheus metrics of message handling, shared by every consumer in a process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "singularity_queue_messages_total", "Messages settled by consumers, by queue and outcome", ["queue", "outcome"]
)
BATCH_SECONDS = Histogram(
    "singularity_queue_batch_seconds", "Time to settle one batch read from a queue (parse, handle, commit)", ["queue"]
)
# The NATS path of the migration (nats_reader.py); the pgmq path's messages are MESSAGES above.
NATS_MESSAGES = Counter(
    "singularity_nats_messages_total",
    "Messages settled from NATS JetStream, by queue and outcome",
    ["queue", "outcome"],
)
NATS_LAST_MESSAGE = Gauge(
    "singularity_nats_last_message_timestamp_seconds", "When the last NATS message of a queue arrived", ["queue"]
)
