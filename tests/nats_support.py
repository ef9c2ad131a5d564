"""Helpers of the NATS migration tests: a stack with its nats-server, a recording handler, NATS publishers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from nats.aio.client import Client
from nats_fixture import NatsStack
from prometheus_client import REGISTRY
from support import Stack

from singularity_stack import contract as c
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, SharedQueue
from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.sharedqueue.nats_reader import NatsDelivery, NatsReader
from singularity_stack.sharedqueue.nats_replies import NatsReplies, ReplyRouter

EFFECTS = "CREATE TABLE IF NOT EXISTS nats_effects (request_id uuid, sender text, path text, attempt int)"


def llm_request(reply_to: str = "singularity_1", **overrides: Any) -> c.LlmRequest:
    data = {
        "reply_to": reply_to,
        "agent_id": "agent-7",
        "task_type": "coder",
        "messages": [{"role": "user", "content": "write fizzbuzz"}],
    }
    return c.LlmRequest(**{**data, **overrides})


def path_of(delivery: Delivery[Any]) -> str:
    return "nats" if isinstance(delivery, NatsDelivery) else "pgmq"


def nats_settled(queue: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("singularity_nats_messages_total", {"queue": queue, "outcome": outcome})
    return value or 0.0


@dataclass
class Dual:
    """A provisioned stack with its nats-server, and Nexus reading llm_requests from both paths."""

    stack: Stack
    nats: NatsStack
    nexus_queue: SharedQueue
    store: IdempotencyStore
    nexus_nc: Client
    router: ReplyRouter

    @property
    def layout(self):
        return self.stack.result.layout

    def nexus_rows(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.stack.db_url("nexus"), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def effects(self) -> list[tuple]:
        return self.nexus_rows("SELECT request_id, sender, path, attempt FROM nats_effects ORDER BY path")

    async def handle(self, delivery: Delivery[c.LlmRequest]) -> None:
        """Nexus's shape: an effect in its database, then the reply, on the path the request came by."""
        assert delivery.sender is not None
        await delivery.db.execute(
            "INSERT INTO nats_effects VALUES (%s, %s, %s, %s)",
            (delivery.message.request_id, delivery.sender, path_of(delivery), delivery.attempt),
        )
        reply = c.LlmResult(request_id=delivery.message.request_id, recipient=delivery.sender, result="ok")
        await self.router.send(delivery, reply)

    def consumer(self, handler: Callable[[Delivery[c.LlmRequest]], Awaitable[None]] | None = None) -> Consumer:
        return Consumer(self.nexus_queue, "llm_requests", c.LlmRequest, handler or self.handle, store=self.store)

    def reader(self, handler=None, **options: Any) -> NatsReader:
        return NatsReader(
            self.nexus_nc,
            self.layout,
            "nexus",
            "llm_requests",
            c.LlmRequest,
            handler or self.handle,
            client=self.nexus_queue,
            store=self.store,
            fetch_timeout=options.pop("fetch_timeout", 0.2),
            **options,
        )

    async def nats_publish(self, request: c.Request, *, as_user: str | None = None) -> int:
        """Publish `request` as a NATS-only Singularity would: on its own request subject."""
        sender = as_user or request.reply_to
        nc = await self.nats.connect(sender)
        ack = await nc.jetstream().publish(
            subjects.request_subject(self.layout, request.queue, sender), request.model_dump_json().encode()
        )
        return int(ack.seq)

    async def nats_publish_raw(self, sender: str, kind: str, body: bytes) -> int:
        nc = await self.nats.connect(sender)
        ack = await nc.jetstream().publish(subjects.request_subject(self.layout, kind, sender), body)
        return int(ack.seq)

    async def nats_replies(self, instance: str, count: int, timeout: float = 10.0) -> list[c.LlmResult]:
        """Exactly `count` replies pulled from `instance`'s NATS reply stream, as that instance."""
        nc = await self.nats.connect(instance)
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(instance, subjects.stream(self.layout, f"llm_results_{instance}"))
        msgs = await sub.fetch(count, timeout=timeout)
        for msg in msgs:
            await msg.ack_sync()
        return [c.LlmResult.model_validate_json(m.data) for m in msgs]

    async def stream_messages(self, queue: str) -> int:
        """How many messages a work queue's stream holds now (asked as the owner)."""
        owner = await self.nats.connect("centralcloud")
        info = await owner.jetstream().stream_info(subjects.stream(self.layout, queue))
        return int(info.state.messages)


async def open_dual(open_stack, nats_for, instances: int = 2, ack_wait: float = 30.0) -> Dual:
    stack = open_stack(instances)
    nats = await nats_for(stack.result.layout, ack_wait=ack_wait)
    with psycopg.connect(stack.db_url("nexus"), autocommit=True) as conn:
        conn.execute(EFFECTS)
    nexus_queue = await stack.queue("nexus")
    store = await stack.store("nexus")
    nexus_nc = await nats.connect("nexus")
    router = ReplyRouter(nexus_queue, NatsReplies(nexus_nc.jetstream(), stack.result.layout, nexus_queue))
    return Dual(stack, nats, nexus_queue, store, nexus_nc, router)


async def until(condition: Callable[[], bool], step: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> None:
    """Run `step` until `condition` holds, within `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await step()
