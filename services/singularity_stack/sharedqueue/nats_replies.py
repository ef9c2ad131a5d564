"""Answering a request on the path it came by: a NATS request on NATS, a pgmq request on pgmq.

A reply to a NATS request goes to the subject derived from its recipient, `<root>.rep.<kind>.<instance>`
(nats_subjects.py), which only that instance may read. Never to a reply subject the request names
(NATS's reply field, or a header): the publisher chose it, and Nexus and Genesis may publish on every
instance's reply subjects, so obeying it would let one instance have its replies sent where it likes.
JetStream keeps the reply in the instance's reply stream and drops a second copy with the same
`Nats-Msg-Id` (its duplicate window): a handler retried after a rollback replies once.

Such a reply reaches no pgmq queue, so nobody would archive it there: the replier writes it into the reply
queue's pgmq archive itself once JetStream has stored it (a grant of its own, provision/privileges.py), under
a negative msg_id derived from the queue and request_id, so writing it again changes nothing, with
`"path": "nats"` in its headers. The history and CentralCloud's analytics see both paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from psycopg import sql

from singularity_stack.contract import Reply
from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.sharedqueue.client import SharedQueue
from singularity_stack.sharedqueue.consumer import Delivery
from singularity_stack.sharedqueue.errors import Unavailable
from singularity_stack.sharedqueue.nats_reader import PATH, NatsDelivery, reply_archive_id
from singularity_stack.topology import StackLayout, reply_queue

log = logging.getLogger(__name__)


class NatsReplies:
    """Publishes replies on NATS, retrying through a nats-server restart for `retry_for` seconds, and
    archives each in pgmq through `archive` (the replier's own shared-queue client)."""

    def __init__(
        self, js: JetStreamContext, layout: StackLayout, archive: SharedQueue, *, retry_for: float = 60.0
    ) -> None:
        self.js = js
        self.layout = layout
        self.archive = archive
        self.retry_for = retry_for

    async def publish(self, reply: Reply) -> int:
        """Publish `reply` to its recipient's reply subject; returns the stream sequence JetStream stored it at."""
        subject = subjects.reply_subject(self.layout, reply.queue, reply.recipient)
        headers = {"Nats-Msg-Id": f"{reply.queue}:{reply.recipient}:{reply.request_id}"}
        payload = reply.model_dump_json().encode()
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                ack = await self.js.publish(subject, payload, timeout=2.0, headers=headers)
                break
            except (TimeoutError, nats.errors.Error, OSError) as error:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"NATS: {error.__class__.__name__}: {error}") from error
                log.warning("NATS unavailable (%s); retrying the reply in %.2fs", error.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        await self._archive(reply, subject, int(ack.seq))
        return int(ack.seq)

    async def _archive(self, reply: Reply, subject: str, seq: int) -> None:
        queue = reply_queue(reply.queue, reply.recipient)
        headers = {"path": "nats", "nats_subject": subject, "nats_stream_seq": seq}
        await self.archive.query(
            sql.SQL(
                "INSERT INTO {} (msg_id, read_ct, enqueued_at, vt, message, headers) "
                "VALUES (%s, 0, clock_timestamp(), clock_timestamp(), %s::jsonb, %s::jsonb) "
                "ON CONFLICT (msg_id) DO NOTHING RETURNING msg_id"
            ).format(sql.Identifier("pgmq", f"a_{queue}")),
            (reply_archive_id(queue, str(reply.request_id)), reply.model_dump_json(), json.dumps(headers)),
        )


def path_of(delivery: Delivery[Any]) -> str:
    """The path a delivery came by: "nats" or "pgmq" (what a reply sent later, e.g. a human's, goes by)."""
    return PATH if isinstance(delivery, NatsDelivery) else "pgmq"


class ReplyRouter:
    """Sends a handler's reply back the way its request came."""

    def __init__(self, queue: SharedQueue, nats: NatsReplies | None) -> None:
        self.queue = queue
        self.nats = nats

    async def send(self, delivery: Delivery[Any], reply: Reply) -> None:
        await self.send_by(path_of(delivery), reply)

    async def send_by(self, path: str, reply: Reply) -> None:
        """Send `reply` on `path` ("nats" or "pgmq"), e.g. the path a held request came by."""
        if path == PATH:
            if self.nats is None:
                raise Unavailable("a NATS request but no NATS connection to answer it on")
            await self.nats.publish(reply)
            return
        await self.queue.publish(reply)
