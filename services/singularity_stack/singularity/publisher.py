"""Where an instance's requests go (SINGULARITY_PUBLISH_TO): the shared queue, NATS, or both.

`nats` and `both` are for dual operation (the migration from NATS): `both` lets either path serve a
request (the receiver handles it once, answering on the path that won); `nats` acts as a NATS-era agent
would. Every request is recorded as a step before it is published, whatever the path (workflow.py).
"""

from __future__ import annotations

from typing import Literal

from singularity_stack import contract as c
from singularity_stack.service.messaging import Messaging
from singularity_stack.sharedqueue import SharedQueue, Unavailable
from singularity_stack.sharedqueue.nats_requests import NatsRequests

PublishTo = Literal["pgmq", "nats", "both"]


class RequestPublisher:
    def __init__(self, queue: SharedQueue, messaging: Messaging, instance: str, to: PublishTo) -> None:
        self.queue = queue
        self.messaging = messaging
        self.instance = instance
        self.to = to

    async def publish(self, message: c.Message) -> int:
        """Publish a request; returns its pgmq id (0 when it went by NATS alone)."""
        assert isinstance(message, c.Request), "an instance publishes requests only"
        msg_id = 0
        if self.to in ("pgmq", "both"):
            msg_id = await self.queue.publish(message)
        if self.to in ("nats", "both"):
            nc = self.messaging.nc
            if nc is None or not self.messaging.connected.is_set():
                # The task is interrupted and replayed (re-sending the request under its id) later.
                raise Unavailable("NATS: not connected yet")
            await NatsRequests(nc.jetstream(), self.messaging.layout, self.instance).publish(message)
        return msg_id
