"""Reliability on real PostgreSQL: killed consumers, many concurrent consumers with failures, a restart."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid

import psycopg
import pytest
from support import Stack, settled

from singularity_stack import contract as c
from singularity_stack.postgres.cluster import LocalCluster
from singularity_stack.provision.provisioner import Provisioner
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, RetryPolicy
from singularity_stack.topology import StackLayout
from singularity_stack_testing.postgres import throwaway_cluster

EFFECTS = "CREATE TABLE IF NOT EXISTS effects (request_id uuid PRIMARY KEY, handled_by text NOT NULL)"


def request(n: int = 0) -> c.LlmRequest:
    return c.LlmRequest(
        reply_to="singularity_1", agent_id="a", task_type="chat", messages=[{"role": "user", "content": str(n)}]
    )


def effects(db_url: str) -> list[tuple[uuid.UUID, str]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT request_id, handled_by FROM effects").fetchall()


# A consumer in its own process whose handler writes its effect, says so, then hangs: we kill -9 it there.
HANGING_CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    from psycopg_pool import AsyncConnectionPool
    from singularity_stack import contract as c
    from singularity_stack.sharedqueue import Consumer, IdempotencyStore, SharedQueue

    async def main(queue_url, db_url):
        pool = AsyncConnectionPool(db_url, open=False)
        await pool.open()
        async def hang(delivery):
            await delivery.db.execute("INSERT INTO effects VALUES (%s, 'victim')", (delivery.message.request_id,))
            print("HANDLING", flush=True)
            await asyncio.sleep(3600)
        async with SharedQueue(queue_url) as client:
            consumer = Consumer(client, "llm_requests", c.LlmRequest, hang,
                                visibility_timeout=2, store=IdempotencyStore(pool))
            await consumer.run_once()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_consumer_killed_mid_message_comes_back_after_its_timeout_and_runs_once(sq: Stack):
    with psycopg.connect(sq.db_url("nexus"), autocommit=True) as conn:
        conn.execute(EFFECTS)
    sent = request()
    await (await sq.queue("singularity_1")).publish(sent)

    victim = subprocess.Popen(
        [sys.executable, "-c", HANGING_CONSUMER, sq.url("nexus"), sq.db_url("nexus")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(victim.stdout.readline), 30)
        assert line.strip() == "HANDLING"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()

    nexus = await sq.queue("nexus")
    assert await nexus.read("llm_requests", visibility_timeout=30, limit=1) == []  # still invisible
    survivor_handled: list[int] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        await delivery.db.execute("INSERT INTO effects VALUES (%s, 'survivor')", (delivery.message.request_id,))
        survivor_handled.append(delivery.attempt)

    store = IdempotencyStore(await sq.db_pool("nexus"))
    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store)
    for _ in range(100):
        if await consumer.run_once():
            break
        await asyncio.sleep(0.1)
    assert survivor_handled == [2]
    assert effects(sq.db_url("nexus")) == [(sent.request_id, "survivor")]  # the killed run left nothing
    assert sq.owner_query("SELECT read_ct FROM pgmq.a_llm_requests") == [(2,)]


async def test_ten_thousand_messages_four_consumers_random_failures(sq: Stack):
    total = 10_000
    with psycopg.connect(sq.db_url("nexus"), autocommit=True) as conn:
        conn.execute(EFFECTS)
    publisher = await sq.queue("singularity_1")
    sent = [request(n) for n in range(total)]
    for start in range(0, total, 500):
        await publisher.publish_batch(sent[start : start + 500])

    rng = random.Random(20261126)
    store = IdempotencyStore(await sq.db_pool("nexus", max_size=16))
    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
    consumers = []
    for name in ("c1", "c2", "c3", "c4"):

        async def handle(delivery: Delivery[c.LlmRequest], name: str = name) -> None:
            await delivery.db.execute("INSERT INTO effects VALUES (%s, %s)", (delivery.message.request_id, name))
            if rng.random() < 0.2:
                raise RuntimeError(f"random failure in {name}")

        client = await sq.queue("nexus", max_size=4)
        consumers.append(
            Consumer(
                client,
                "llm_requests",
                c.LlmRequest,
                handle,
                batch_size=4,
                poll_interval=0.02,
                store=store,
                policy=policy,
            )
        )

    stop = asyncio.Event()
    handled_before = settled("llm_requests", "handled")
    tasks = [asyncio.create_task(consumer.run(stop)) for consumer in consumers]

    async def drained() -> None:
        while sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests") != [(0,)]:
            await asyncio.sleep(0.25)

    await asyncio.wait_for(drained(), 240)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)

    archived = {uuid.UUID(r[0]) for r in sq.owner_query("SELECT message->>'request_id' FROM pgmq.a_llm_requests")}
    letters = [c.DeadLetter.model_validate(r[0]) for r in sq.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")]
    dead = {uuid.UUID(letter.message["request_id"]) for letter in letters}
    everything = {m.request_id for m in sent}
    assert archived | dead == everything, "a message was lost"
    assert not archived & dead, "a message was both archived and dead-lettered"
    assert all(letter.reason == "failed" and letter.attempts == 3 for letter in letters)
    assert 0 < len(dead) < 0.05 * total  # 0.2 ** 3 = 0.8% expected
    done = effects(sq.db_url("nexus"))
    assert {r for r, _ in done} == archived  # every archived message has exactly one effect (primary key)
    handled = settled("llm_requests", "handled") - handled_before
    assert handled == len(done) == len(archived)
    assert len({name for _, name in done}) == 4  # all four consumers took part


@pytest.fixture
def own_cluster(open_tmp):
    """A cluster of this test's own to restart; synchronous commit stays on, so a crash loses nothing acknowledged."""
    cluster = throwaway_cluster()
    cluster.settings.pop("synchronous_commit", None)
    cluster.settings.pop("full_page_writes", None)
    cluster.start()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)


async def test_postgres_restart_under_load_loses_nothing(own_cluster: LocalCluster):
    stack = Stack(Provisioner(own_cluster.dsn(), StackLayout(1), report=lambda _: None).run())
    try:
        await _restart_under_load(stack, own_cluster)
    finally:
        await stack.close()


async def _restart_under_load(stack: Stack, cluster: LocalCluster) -> None:
    with psycopg.connect(stack.db_url("nexus"), autocommit=True) as conn:
        conn.execute(EFFECTS)
    publisher = await stack.queue("singularity_1", retry_for=60)
    nexus = await stack.queue("nexus", retry_for=60)
    store = IdempotencyStore(await stack.db_pool("nexus"))

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        await delivery.db.execute("INSERT INTO effects VALUES (%s, 'nexus')", (delivery.message.request_id,))

    stop = asyncio.Event()
    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, poll_interval=0.05, store=store)
    consuming = asyncio.create_task(consumer.run(stop))
    acknowledged: list[uuid.UUID] = []

    async def publish(count: int) -> None:
        for n in range(count):
            message = request(n)
            await publisher.publish(message)
            acknowledged.append(message.request_id)
            await asyncio.sleep(0.002)

    publishing = asyncio.create_task(publish(600))
    while len(acknowledged) < 150:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(cluster.restart, "immediate")  # a crash and recovery, mid-traffic
    await asyncio.wait_for(publishing, 120)

    async def all_handled() -> None:
        # every acknowledged message has its effect, and retried publishes' duplicates are drained too
        while len(effects(stack.db_url("nexus"))) < len(acknowledged) or stack.owner_query(
            "SELECT count(*) FROM pgmq.q_llm_requests"
        ) != [(0,)]:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(all_handled(), 120)
    stop.set()
    await asyncio.wait_for(consuming, 30)
    handled = [r for r, _ in effects(stack.db_url("nexus"))]
    assert set(handled) == set(acknowledged)
    assert len(handled) == len(acknowledged) == 600
    assert stack.owner_query("SELECT count(*) FROM pgmq.q_llm_requests_dlq") == [(0,)]
