"""Shared-queue benchmark: the client against raw pgmq SQL on the same server, and NOTIFY wake-up latency.

    .venv/bin/python bench/queue_bench.py [--admin-dsn DSN] [--messages 10000]

Without --admin-dsn it starts a throwaway local PostgreSQL (fsync off, as in the tests).
Every figure is publish → consume → archive of the same small LlmRequest; raw and client runs are
interleaved and repeated, and the medians compared, because a 2-core VM is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable

import psycopg

from singularity_stack import contract as c
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, NotifyListener, SharedQueue
from singularity_stack.sharedqueue.client import SEND_BATCH_SQL
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.topology import NOTIFY_THROTTLE_MS, StackLayout
from singularity_stack_testing.postgres import throwaway_cluster

QUEUE = "llm_requests"


def request(n: int) -> c.LlmRequest:
    return c.LlmRequest(
        reply_to="singularity_1", agent_id="bench", task_type="chat", messages=[{"role": "user", "content": f"q{n}"}]
    )


async def timed(label: str, count: int, work: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - start
    rate = count / elapsed
    print(f"  {label:<44} {rate:>10,.0f} msg/s   ({count:,} in {elapsed:.2f} s)", flush=True)
    return rate


def purge(owner_url: str) -> None:
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.purge_queue(%s)", (QUEUE,))
        conn.execute(f"TRUNCATE pgmq.a_{QUEUE}")


async def raw_pgmq(stack: ProvisionResult, count: int, batch: int) -> float:
    """Plain SQL on one connection per side: pgmq.send / send_batch, read, json.loads, archive. The batch is
    passed as one JSON array, the fastest way found to hand pgmq.send_batch its messages, as the client does."""
    bodies = [request(n).model_dump_json() for n in range(count)]
    sender = await psycopg.AsyncConnection.connect(stack.credentials["singularity_1"].shared_queue_url, autocommit=True)
    reader = await psycopg.AsyncConnection.connect(stack.credentials["nexus"].shared_queue_url, autocommit=True)

    async def work() -> None:
        if batch == 1:
            for body in bodies:
                await sender.execute("SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, body))
        else:
            for start in range(0, count, batch):
                chunk = "[" + ",".join(bodies[start : start + batch]) + "]"
                await sender.execute(SEND_BATCH_SQL, (QUEUE, chunk))
        done = 0
        while done < count:
            cur = await reader.execute("SELECT msg_id, message::text FROM pgmq.read(%s, 30, %s)", (QUEUE, batch))
            rows = await cur.fetchall()
            decoded = [json.loads(row[1]) for row in rows]  # the least any consumer does with a message
            ids = [row[0] for row, _ in zip(rows, decoded, strict=True)]
            await reader.execute("SELECT pgmq.archive(%s, %s::bigint[])", (QUEUE, ids))
            done += len(ids)

    try:
        return await timed(f"raw pgmq SQL, batch {batch}", count, work)
    finally:
        await sender.close()
        await reader.close()


async def notify_cost(stack: ProvisionResult, count: int) -> None:
    """What pgmq's per-row insert trigger (enable_notify_insert, throttle 0) costs send_batch(100)."""
    owner = await psycopg.AsyncConnection.connect(stack.credentials["centralcloud"].shared_queue_url, autocommit=True)
    bodies = "[" + ",".join(request(n).model_dump_json() for n in range(100)) + "]"
    await owner.execute("SELECT pgmq.create('bench_plain')")
    try:
        for queue, label in [("bench_plain", "without"), (QUEUE, "with")]:

            async def send(queue: str = queue) -> None:
                for _ in range(count // 100):
                    await owner.execute(SEND_BATCH_SQL, (queue, bodies))

            await timed(f"raw send_batch(100) only, {label} notify trigger", count, send)
    finally:
        await owner.execute("SELECT pgmq.drop_queue('bench_plain')")
        await owner.close()


async def client(stack: ProvisionResult, count: int, batch: int, idempotent: bool = False) -> float:
    """The project's client: pydantic messages in, validated messages out, archive per batch. Plain: read,
    validate, archive (no handler contract). Idempotent: the Consumer, every message claimed in Nexus's
    database (one transaction per batch, a savepoint per message) and handed to a handler."""
    messages = [request(n) for n in range(count)]
    handled = 0

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        nonlocal handled
        handled += 1

    publisher = await SharedQueue(stack.credentials["singularity_1"].shared_queue_url, max_size=1).open()
    reader = await SharedQueue(stack.credentials["nexus"].shared_queue_url, max_size=1).open()
    pool = connection_pool(stack.credentials["nexus"].database_url, max_size=2)
    await pool.open(wait=True)
    consumer = Consumer(reader, QUEUE, c.LlmRequest, handle, store=IdempotencyStore(pool), batch_size=batch)

    async def consume_plain() -> None:
        nonlocal handled
        raws = await reader.read(QUEUE, visibility_timeout=30, limit=batch)
        for raw in raws:
            c.LlmRequest.model_validate_json(raw.body)
            handled += 1
        await reader.archive(QUEUE, [raw.msg_id for raw in raws])

    async def work() -> None:
        if batch == 1:
            for message in messages:
                await publisher.publish(message)
        else:
            for start in range(0, count, batch):
                await publisher.publish_batch(messages[start : start + batch])
        while handled < count:
            await (consumer.run_once() if idempotent else consume_plain())

    label = f"client, batch {batch}" + (" + idempotent Consumer" if idempotent else "")
    try:
        return await timed(label, count, work)
    finally:
        await publisher.close()
        await reader.close()
        await pool.close()


async def wake_latency(stack: ProvisionResult, samples: int, spacing: float) -> tuple[float, float]:
    """Time from just before publish to the handler running, with the consumer asleep on NOTIFY."""
    publisher = await SharedQueue(stack.credentials["singularity_1"].shared_queue_url, max_size=1).open()
    reader = await SharedQueue(stack.credentials["nexus"].shared_queue_url, max_size=2).open()
    listener = NotifyListener(stack.credentials["nexus"].shared_queue_url, [QUEUE])
    got = asyncio.Event()

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        got.set()

    pool = connection_pool(stack.credentials["nexus"].database_url, max_size=2)
    await pool.open(wait=True)
    store = IdempotencyStore(pool)
    consumer = Consumer(
        reader, QUEUE, c.LlmRequest, handle, store=store, poll_interval=3600, wakeup=listener.event(QUEUE)
    )
    stop = asyncio.Event()
    listening = asyncio.create_task(listener.run())
    await listener.connected.wait()
    consuming = asyncio.create_task(consumer.run(stop))
    latencies = []
    for n in range(samples):
        await asyncio.sleep(spacing)
        got.clear()
        start = time.perf_counter()
        await publisher.publish(request(n))
        await got.wait()
        latencies.append((time.perf_counter() - start) * 1000)
    stop.set()
    await consuming
    listening.cancel()
    await publisher.close()
    await reader.close()
    await pool.close()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"  send → handler wake-up, messages {spacing * 1000:.0f} ms apart ({samples} samples): "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )
    return p50, p99


async def run(stack: ProvisionResult, count: int, repeats: int) -> None:
    owner = stack.credentials["centralcloud"].shared_queue_url
    single = min(count, 2000)
    print(f"publish → consume → archive; each pair run {repeats} times, interleaved, median shown:")
    benches = {
        "raw1": lambda: raw_pgmq(stack, single, 1),
        "client1": lambda: client(stack, single, 1),
        "raw100": lambda: raw_pgmq(stack, count, 100),
        "client100": lambda: client(stack, count, 100),
        "client100i": lambda: client(stack, count, 100, idempotent=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(repeats):
        for name, bench in benches.items():
            purge(owner)
            rates[name].append(await bench())
    median = {name: statistics.median(values) for name, values in rates.items()}
    print("medians:")
    for name, label in [
        ("raw1", "raw pgmq SQL, batch 1"),
        ("client1", "client, batch 1"),
        ("raw100", "raw pgmq SQL, batch 100"),
        ("client100", "client, batch 100"),
        ("client100i", "client, batch 100 + idempotent Consumer"),
    ]:
        print(f"  {label:<44} {median[name]:>10,.0f} msg/s")
    print(f"  idempotent / plain, batch 100: {median['client100i'] / median['client100']:.0%}  (goal: at least 60%)")
    print(f"  client / raw, batch 1:   {median['client1'] / median['raw1']:.0%}")
    print(f"  client / raw, batch 100: {median['client100'] / median['raw100']:.0%}  (goal: at least 80%)")
    purge(owner)
    await notify_cost(stack, count)
    purge(owner)
    print(f"NOTIFY wake-up (pgmq throttle {NOTIFY_THROTTLE_MS} ms per queue; a consumer rereads once after it):")
    await wake_latency(stack, 300, 0.02)
    purge(owner)
    await wake_latency(stack, 300, 0.001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-dsn")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cluster = None
    admin_dsn = args.admin_dsn
    if not admin_dsn:
        cluster = throwaway_cluster().start()
        admin_dsn = cluster.dsn()
        print(f"PostgreSQL {cluster.installation.version} ({cluster.installation.source}), fsync off, loopback")
    try:
        stack = Provisioner(admin_dsn, StackLayout(1, "bench_"), report=lambda _: None).run()
        asyncio.run(run(stack, args.messages, args.repeats))
    finally:
        if cluster:
            cluster.stop("immediate")
            shutil.rmtree(cluster.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
