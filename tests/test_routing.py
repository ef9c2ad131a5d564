"""Three Singularity instances share Nexus: every reply reaches only the instance that asked."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from singularity_stack import contract as c
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, NotifyListener
from singularity_stack.topology import reply_queue

INSTANCES = ["singularity_1", "singularity_2", "singularity_3"]
PER_INSTANCE = 150


async def test_replies_are_never_lost_or_stolen_under_concurrent_traffic(open_stack):
    three = open_stack(3)
    stop = asyncio.Event()
    nexus = await three.queue("nexus", max_size=8)

    async def answer(delivery: Delivery[c.LlmRequest]) -> None:
        request = delivery.message
        await nexus.publish(c.LlmResult(**c.reply_fields(request), result=f"for {request.agent_id}", model="echo"))

    nexus_listener = NotifyListener(three.url("nexus"), ["llm_requests"])
    router = Consumer(
        nexus,
        "llm_requests",
        c.LlmRequest,
        answer,
        store=await three.store("nexus"),
        batch_size=20,
        wakeup=nexus_listener.event("llm_requests"),
    )
    tasks = [asyncio.create_task(nexus_listener.run()), asyncio.create_task(router.run(stop))]

    received: dict[str, list[c.LlmResult]] = {i: [] for i in INSTANCES}
    sent: dict[str, set[uuid.UUID]] = {i: set() for i in INSTANCES}
    for instance in INSTANCES:
        client = await three.queue(instance, max_size=4)
        queue = reply_queue("llm_results", instance)
        listener = NotifyListener(three.url(instance), [queue])

        async def collect(delivery: Delivery[c.LlmResult], instance: str = instance) -> None:
            received[instance].append(delivery.message)

        consumer = Consumer(
            client,
            queue,
            c.LlmResult,
            collect,
            store=IdempotencyStore(await three.db_pool(instance, 4)),
            wakeup=listener.event(queue),
        )
        tasks += [asyncio.create_task(listener.run()), asyncio.create_task(consumer.run(stop))]

    async def ask(instance: str, count: int) -> None:
        client = await three.queue(instance, max_size=2)
        for n in range(count):
            request = c.LlmRequest(
                reply_to=instance, agent_id=instance, task_type="chat", messages=[{"role": "user", "content": str(n)}]
            )
            sent[instance].add(request.request_id)
            await client.publish(request)

    # three publishers per instance, all at once
    await asyncio.gather(*(ask(i, PER_INSTANCE // 3) for i in INSTANCES for _ in range(3)))

    async def all_answered() -> None:
        while any(len(received[i]) < PER_INSTANCE for i in INSTANCES):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(all_answered(), 60)
    stop.set()
    await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    for instance in INSTANCES:
        ids = [r.request_id for r in received[instance]]
        assert len(ids) == len(set(ids)) == PER_INSTANCE
        assert set(ids) == sent[instance]
        assert {r.result for r in received[instance]} == {f"for {instance}"}
        assert {r.recipient for r in received[instance]} == {instance}

    # and PostgreSQL, not politeness, keeps instance 1 out of instance 2's replies
    with psycopg.connect(three.url("singularity_1")) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM pgmq.read('llm_results_singularity_2', 30, 1)")
