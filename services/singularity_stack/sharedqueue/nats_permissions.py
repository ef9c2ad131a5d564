"""nats-server's authorization for a stack, derived from the topology's grants: a pure function.

Each service and each Singularity instance has its own NATS user (named like its PostgreSQL role), and
may publish and subscribe only where its pgmq grants let it send and consume (topology.StackLayout.grants):

- send to a request queue (an instance): publish on `<root>.req.<kind>.<itself>`, never on another
  instance's name; that is what makes the subject's sender token vouched (nats_subjects.py);
- send to a reply queue (Nexus, Genesis): publish on that instance's `<root>.rep.<kind>.<instance>`;
- consume a work queue: subscribe to its subjects, and on its stream, through its own durable consumer
  only, the JetStream API calls a pull consumer makes (consumer info, next message, acks);
- every user: subscribe to its own inbox prefix only (`_INBOX_<user>.>`: publish acks, API answers and
  pulled messages), so no user sees another's;
- centralcloud, owner of every queue as in PostgreSQL: the JetStream API (creates the streams and their
  consumers, nats_streams.py).

Dead-letter queues have no NATS side: NATS messages that cannot be handled are dead-lettered in pgmq.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.topology import Access, StackLayout

OWNER = "centralcloud"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def permissions(layout: StackLayout, logical: str) -> Permissions:
    """What `logical` (a service or an instance id) may publish and subscribe to."""
    if logical not in layout.owners:
        raise ValueError(f"{logical!r} is not a service or instance of this stack")
    publish: list[str] = []
    subscribe: list[str] = [subjects.inbox_prefix(layout, logical) + ".>"]
    if logical == OWNER:
        publish.append("$JS.API.>")
    for grant in layout.grants:
        if grant.role != logical:
            continue
        work = subjects.work_queue(layout, grant.queue)
        if work is None:
            continue  # a dead-letter queue: pgmq only
        if grant.access is Access.SEND:
            publish.append(
                subjects.reply_subject(layout, work.kind, work.instance)
                if work.instance
                else subjects.request_subject(layout, work.kind, logical)
            )
            continue
        stream, consumer = subjects.stream(layout, grant.queue), subjects.durable(logical)
        subscribe.append(subjects.queue_subject(layout, grant.queue))
        publish += [
            f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            f"$JS.ACK.{stream}.{consumer}.>",
        ]
    return Permissions(tuple(publish), tuple(subscribe))


def users(layout: StackLayout, passwords: Mapping[str, str]) -> list[dict[str, Any]]:
    """nats-server's `authorization.users`: every service and instance with its password (by logical name)."""
    entries = []
    for logical in layout.owners:
        allowed = permissions(layout, logical)
        entries.append(
            {
                "user": subjects.user(layout, logical),
                "password": passwords[logical],
                "permissions": {
                    "publish": {"allow": list(allowed.publish)},
                    "subscribe": {"allow": list(allowed.subscribe)},
                },
            }
        )
    return entries
