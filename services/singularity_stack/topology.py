"""Pure description of a stack: its databases, roles, physical queues and who may do what on them.

Replies go to per-instance queues (`llm_results_singularity_2`), so PostgreSQL itself keeps one
Singularity instance from reading another's replies. Each consumed queue has a dead-letter
queue `<queue>_dlq`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property

from singularity_stack.contract import REPLIES, REQUESTS

SHARED_SERVICES = ("centralcloud", "genesis", "nexus")  # one each per stack, beside the N instances
SHARED_QUEUE = "shared_queue"
ANALYTICS = "centralcloud_analytics"
DLQ_SUFFIX = "_dlq"
MAX_INSTANCES = 9999
# pgmq notifies listeners of an insert at most once per this many milliseconds per queue. Any throttle
# triples batch publish throughput (pgmq's trigger no longer rewrites its row for every inserted
# message); consumers make up for the notifications it skips with one extra read after each wake-up
# (see Consumer.run), so a message inside the window waits at most this long.
NOTIFY_THROTTLE_MS = 2

# Which service consumes each request kind (the design's queue table).
REQUEST_CONSUMER = {
    "llm_requests": "nexus",
    "approval_requests": "nexus",
    "question_requests": "nexus",
    "job_requests": "genesis",
}
# Which service sends each reply kind. Browser decisions reach the queue through Nexus.
REPLY_SENDER = {
    "llm_results": "nexus",
    "approval_responses": "nexus",
    "question_responses": "nexus",
    "job_results": "genesis",
}
assert set(REQUEST_CONSUMER) == set(REQUESTS) and set(REPLY_SENDER) == set(REPLIES)


class Access(enum.StrEnum):
    SEND = "send"  # pgmq.send / send_batch
    CONSUME = "consume"  # pgmq.read, archive, delete, set_vt


def instance_id(index: int) -> str:
    if not 1 <= index <= MAX_INSTANCES:
        raise ValueError(f"Singularity instance index must be 1..{MAX_INSTANCES}, got {index}")
    return f"singularity_{index}"


def reply_queue(kind: str, instance: str) -> str:
    if kind not in REPLIES:
        raise ValueError(f"{kind!r} is not a reply kind")
    return f"{kind}_{instance}"


def dead_letter_queue(queue: str) -> str:
    return queue + DLQ_SUFFIX


@dataclass(frozen=True)
class Grant:
    role: str  # logical role: a service name or an instance id
    queue: str
    access: Access


@dataclass(frozen=True)
class StackLayout:
    """Names in a stack with N Singularity instances. `prefix` lets several stacks share one server."""

    instances: int
    prefix: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.instances <= MAX_INSTANCES:
            raise ValueError(f"singularity instances must be 1..{MAX_INSTANCES}, got {self.instances}")

    @cached_property
    def instance_ids(self) -> tuple[str, ...]:
        return tuple(instance_id(i) for i in range(1, self.instances + 1))

    @cached_property
    def owners(self) -> tuple[str, ...]:
        """Logical names that own a private database: the services and each instance."""
        return (*SHARED_SERVICES, *self.instance_ids)

    def role(self, logical: str) -> str:
        return self.prefix + logical

    def database(self, logical: str) -> str:
        return self.prefix + logical

    @property
    def shared_queue_database(self) -> str:
        return self.prefix + SHARED_QUEUE

    @property
    def analytics_role(self) -> str:
        return self.prefix + ANALYTICS

    @cached_property
    def work_queues(self) -> tuple[str, ...]:
        """Queues that carry messages: the request queues and every instance's reply queues."""
        replies = (reply_queue(kind, i) for i in self.instance_ids for kind in REPLIES)
        return (*REQUESTS, *replies)

    @cached_property
    def queues(self) -> tuple[str, ...]:
        """Every physical queue, dead-letter queues included."""
        return tuple(q for work in self.work_queues for q in (work, dead_letter_queue(work)))

    @cached_property
    def grants(self) -> tuple[Grant, ...]:
        """What each non-owner role may do. CentralCloud owns every queue and needs no grant."""
        grants: list[Grant] = []

        def consume(role: str, queue: str) -> None:
            grants.append(Grant(role, queue, Access.CONSUME))
            grants.append(Grant(role, dead_letter_queue(queue), Access.SEND))

        for kind, consumer in REQUEST_CONSUMER.items():
            consume(consumer, kind)
        for instance in self.instance_ids:
            for kind in REQUESTS:
                grants.append(Grant(instance, kind, Access.SEND))
            for kind, sender in REPLY_SENDER.items():
                queue = reply_queue(kind, instance)
                consume(instance, queue)
                grants.append(Grant(sender, queue, Access.SEND))
        return tuple(grants)
