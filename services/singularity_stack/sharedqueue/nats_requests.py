"""Publishing a Singularity instance's requests on NATS (dual operation), as a NATS-era agent did.

On the instance's own request subject, `<root>.req.<kind>.<instance>`, the only one its NATS user may
publish on, so the receiver knows the sender. `Nats-Msg-Id` makes a re-send within JetStream's duplicate
window one message; a later one is a duplicate to the receiver's idempotency claim, as on pgmq.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
from nats.js import JetStreamContext

from singularity_stack.contract import Request
from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.sharedqueue.errors import Unavailable
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)


class NatsRequests:
    def __init__(self, js: JetStreamContext, layout: StackLayout, instance: str, *, retry_for: float = 10.0) -> None:
        self.js = js
        self.layout = layout
        self.instance = instance
        self.retry_for = retry_for

    async def publish(self, request: Request) -> int:
        """Publish `request` (its reply_to must be this instance); the stream sequence JetStream stored it at.
        Raises Unavailable when nats-server does not answer within `retry_for` seconds."""
        if request.reply_to != self.instance:
            raise ValueError(f"{self.instance} cannot publish a request whose reply_to is {request.reply_to}")
        subject = subjects.request_subject(self.layout, request.queue, self.instance)
        headers = {"Nats-Msg-Id": f"{request.queue}:{self.instance}:{request.request_id}"}
        payload = request.model_dump_json().encode()
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                ack = await self.js.publish(subject, payload, timeout=2.0, headers=headers)
                return int(ack.seq)
            except (TimeoutError, nats.errors.Error, OSError) as error:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"NATS: {error.__class__.__name__}: {error}") from error
                log.warning("NATS unavailable (%s); retrying the request in %.2fs", error.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
