"""The NATS names of a stack's queues, for the migration from NATS (dual operation): pure functions.

Every physical work queue of the shared queue has a JetStream stream of the same name (with the stack's
prefix, as PostgreSQL's roles have it) and subjects under one root per stack, `<prefix>singularity`:

    <root>.req.<kind>.<sender>        a request, e.g. t1_singularity.req.llm_requests.singularity_2
    <root>.rep.<kind>.<instance>      a reply to that instance, e.g. t1_singularity.rep.llm_results.singularity_2

The sender is part of a request's subject because it is the one thing about a NATS message that
nats-server vouches for: each instance's user may publish only on subjects that end in its own name
(nats_permissions.py), so a message on `...singularity_2` was published by singularity_2. Headers are
whatever the publisher wrote and prove nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from singularity_stack.contract import REPLIES, REQUESTS
from singularity_stack.topology import REQUEST_CONSUMER, StackLayout

REQUEST = "req"
REPLY = "rep"
# A subject token or stream name: no separators, wildcards or white space (nats-server's rules, narrowed).
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_INSTANCE = re.compile(r"^singularity_[1-9][0-9]{0,3}$")


def _token(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} cannot be a NATS subject token or stream name")
    return value


def root(layout: StackLayout) -> str:
    """The first token of every subject of the stack."""
    return _token(f"{layout.prefix}singularity")


def is_instance(layout: StackLayout, name: str) -> bool:
    """Whether `name` is an instance id of this stack (without scanning them: a stack may have thousands)."""
    return bool(_INSTANCE.match(name)) and int(name.removeprefix("singularity_")) <= layout.instances


def request_subject(layout: StackLayout, kind: str, sender: str) -> str:
    if kind not in REQUESTS:
        raise ValueError(f"{kind!r} is not a request kind")
    if not is_instance(layout, sender):
        raise ValueError(f"{sender!r} is not an instance of this stack")
    return f"{root(layout)}.{REQUEST}.{kind}.{sender}"


def reply_subject(layout: StackLayout, kind: str, instance: str) -> str:
    if kind not in REPLIES:
        raise ValueError(f"{kind!r} is not a reply kind")
    if not is_instance(layout, instance):
        raise ValueError(f"{instance!r} is not an instance of this stack")
    return f"{root(layout)}.{REPLY}.{kind}.{instance}"


@dataclass(frozen=True)
class WorkQueue:
    """A work queue by its parts: a request kind (instance ""), or a reply kind and its instance."""

    kind: str
    instance: str = ""

    @property
    def reader(self) -> str:
        """Who consumes it: Nexus or Genesis for requests, the instance for its replies."""
        return self.instance or REQUEST_CONSUMER[self.kind]


def work_queue(layout: StackLayout, queue: str) -> WorkQueue | None:
    """The parts of a work queue of this stack; None for anything else (dead-letter queues included)."""
    if queue in REQUESTS:
        return WorkQueue(queue)
    for kind in REPLIES:
        instance = queue.removeprefix(f"{kind}_")
        if instance != queue and is_instance(layout, instance):
            return WorkQueue(kind, instance)
    return None


def queue_subject(layout: StackLayout, queue: str) -> str:
    """The subject filter of a work queue's stream: every sender's requests, or one instance's replies."""
    work = work_queue(layout, queue)
    if work is None:
        raise ValueError(f"{queue!r} is not a work queue of this stack")
    if work.instance:
        return reply_subject(layout, work.kind, work.instance)
    return f"{root(layout)}.{REQUEST}.{work.kind}.*"


def stream(layout: StackLayout, queue: str) -> str:
    """The JetStream stream that holds a work queue's NATS messages (named like its pgmq queue)."""
    queue_subject(layout, queue)  # a work queue of the stack, or ValueError
    return _token(layout.prefix + queue)


def user(layout: StackLayout, logical: str) -> str:
    """A service's (or instance's) NATS user: its PostgreSQL role's name."""
    return _token(layout.role(logical))


def inbox_prefix(layout: StackLayout, logical: str) -> str:
    """Where a user's replies from the server arrive (JetStream API answers, publish acks, pulled messages):
    its own, so no other user may subscribe to them."""
    return f"_INBOX_{user(layout, logical)}"


def durable(logical: str) -> str:
    """The durable consumer a service reads a stream through: one per service, named after it."""
    return _token(logical)


@dataclass(frozen=True)
class RequestSubject:
    kind: str
    sender: str


def parse_request_subject(layout: StackLayout, subject: str) -> RequestSubject | None:
    """The kind and vouched sender of a request subject of this stack, or None for any other subject."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != root(layout) or parts[1] != REQUEST:
        return None
    kind, sender = parts[2], parts[3]
    if kind not in REQUESTS or not is_instance(layout, sender):
        return None
    return RequestSubject(kind, sender)
