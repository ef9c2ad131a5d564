"""The shared-queue client: publish, consume with retries and dead-lettering, wake on NOTIFY."""

from singularity_stack.sharedqueue.client import QueueMetrics, RawMessage, SharedQueue, queue_for
from singularity_stack.sharedqueue.consumer import Consumer, Delivery, RetryPolicy
from singularity_stack.sharedqueue.errors import Permanent, RetryAfter, Unavailable
from singularity_stack.sharedqueue.idempotency import IdempotencyStore
from singularity_stack.sharedqueue.notify import NotifyListener

__all__ = [
    "Consumer",
    "Delivery",
    "IdempotencyStore",
    "NotifyListener",
    "Permanent",
    "QueueMetrics",
    "RawMessage",
    "RetryAfter",
    "RetryPolicy",
    "SharedQueue",
    "Unavailable",
    "queue_for",
]
