"""The shared-queue client: publish, consume with retries and dead-lettering, wake on NOTIFY."""

from singularity_stack.sharedqueue.client import QueueMetrics, RawMessage, SharedQueue, queue_for
from singularity_stack.sharedqueue.consumer import Consumer, ConsumerStats, Delivery, RetryPolicy
from singularity_stack.sharedqueue.idempotency import IdempotencyStore
from singularity_stack.sharedqueue.notify import NotifyListener

__all__ = [
    "Consumer",
    "ConsumerStats",
    "Delivery",
    "IdempotencyStore",
    "NotifyListener",
    "QueueMetrics",
    "RawMessage",
    "RetryPolicy",
    "SharedQueue",
    "queue_for",
]
