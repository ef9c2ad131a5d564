"""The JetStream side of a stack's work queues: a stream per queue and a durable consumer per reader.

Run as the owner's NATS user (centralcloud, as for the pgmq queues). Idempotent: what exists is left
alone. Streams keep a message until its one consumer acknowledges it (work-queue retention, like a pgmq
queue; the history is pgmq's archive, where the reader writes every handled message). A consumer never
gives up on a message by itself (no max_deliver): the reader counts attempts and dead-letters in pgmq,
as the pgmq Consumer does.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)


async def ensure_streams(js: JetStreamContext, layout: StackLayout, *, ack_wait: float = 30.0) -> list[str]:
    """Create every missing stream and durable consumer; returns the streams created. `ack_wait`: how long
    a delivered message may go without an ack or a progress signal before it is redelivered (a reader that
    died); readers signal progress while a handler runs."""
    created = []
    for queue in layout.work_queues:
        name = subjects.stream(layout, queue)
        try:
            await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=name,
                    subjects=[subjects.queue_subject(layout, queue)],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,
                )
            )
            created.append(name)
            log.info("NATS stream %s created", name)
        work = subjects.work_queue(layout, queue)
        assert work is not None  # every work queue of the layout is one
        consumer = subjects.durable(work.reader)
        try:
            await js.consumer_info(name, consumer)
        except NotFoundError:
            await js.add_consumer(
                name,
                ConsumerConfig(
                    durable_name=consumer,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=ack_wait,
                    max_deliver=-1,
                ),
            )
    return created
