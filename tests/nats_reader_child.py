"""A Nexus-like process reading llm_requests from NATS, to be killed mid-message (tests/test_nats_reliability.py).

Reads its settings as JSON from argv[1]. Its handler records the effect, then, per `mode`, stops for good
inside the handler (the transaction open) or in an after-commit callback (the claim committed, the message
not yet archived nor acknowledged), saying so on stdout first.
"""

from __future__ import annotations

import asyncio
import json
import sys

from singularity_stack import contract as c
from singularity_stack.sharedqueue import Delivery, IdempotencyStore, SharedQueue
from singularity_stack.sharedqueue.nats_connection import connect
from singularity_stack.sharedqueue.nats_reader import NatsReader
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.topology import StackLayout


async def main(settings: dict) -> None:
    layout = StackLayout(settings["instances"], settings["prefix"])
    nc = await connect(settings["nats_url"], layout, "nexus", settings["nats_password"])
    queue = await SharedQueue(settings["shared_queue_url"]).open()
    pool = connection_pool(settings["database_url"])
    await pool.open(wait=True)
    forever = asyncio.Event()

    async def stuck() -> None:
        print("COMMITTED", flush=True)
        await forever.wait()

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        await delivery.db.execute(
            "INSERT INTO nats_effects VALUES (%s, %s, 'nats', %s)",
            (delivery.message.request_id, delivery.sender, delivery.attempt),
        )
        if settings["mode"] == "in_handler":
            print("IN_HANDLER", flush=True)
            await forever.wait()
        delivery.after_commit(stuck)

    reader = NatsReader(
        nc,
        layout,
        "nexus",
        "llm_requests",
        c.LlmRequest,
        handle,
        client=queue,
        store=IdempotencyStore(pool),
        fetch_timeout=0.2,
    )
    await reader.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
