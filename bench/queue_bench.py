"""Shared-queue benchmark: the client against raw pgmq SQL on the same server, what pgmq's notification
trigger costs, the client's CPU per message outside the database, and NOTIFY wake-up latency.

    .venv/bin/python bench/queue_bench.py [--admin-dsn DSN] [--messages 2000] [--samples 15] [--warmup 1]

Without --admin-dsn it starts a throwaway local PostgreSQL (fsync off, as in the tests).
Every throughput figure is publish → consume → archive of the same small LlmRequest. The runs compared are
interleaved (A, B, A, B ...) after warm-up rounds (bench/samples.py): a ratio is taken per round, from runs
made side by side, and shown as the median with its spread, because a shared 2-core VM is noisy. Samples are
short (a second or less) and many: the load of a shared machine changes over seconds, so two runs a second
apart see nearly the same machine, and the median of many rounds drops the rounds a burst of load split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
import timeit
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import psycopg
from samples import Samples, goal, interleave, interleave_async, ratio

from singularity_stack import contract as c
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, NotifyListener, SharedQueue
from singularity_stack.sharedqueue.client import SEND_BATCH_SQL, RawMessage, queue_for
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
    print(f"    {label:<52} {rate:>10,.0f} msg/s   ({count:,} in {elapsed:.2f} s)", flush=True)
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


async def notify_cost(stack: ProvisionResult, count: int, samples: int, warmup: int) -> None:
    """What pgmq's per-row insert trigger (enable_notify_insert) costs send_batch(100): no trigger, our
    throttle, and throttle 0 (every row notifies and rewrites its queue's row in pgmq.notify_insert_throttle)."""
    owner = await psycopg.AsyncConnection.connect(stack.credentials["centralcloud"].shared_queue_url, autocommit=True)
    bodies = "[" + ",".join(request(n).model_dump_json() for n in range(100)) + "]"
    await owner.execute("SELECT pgmq.create('bench_plain')")
    await owner.execute("SELECT pgmq.create('bench_unthrottled')")
    await owner.execute("SELECT pgmq.enable_notify_insert('bench_unthrottled', 0)")
    queues = {
        "no trigger": "bench_plain",
        f"trigger, throttle {NOTIFY_THROTTLE_MS} ms (ours)": QUEUE,
        "trigger, throttle 0": "bench_unthrottled",
    }

    def send(label: str, queue: str) -> Callable[[], Awaitable[float]]:
        async def measure() -> float:
            await owner.execute("SELECT pgmq.purge_queue(%s)", (queue,))

            async def work() -> None:
                for _ in range(count // 100):
                    await owner.execute(SEND_BATCH_SQL, (queue, bodies))

            return await timed(f"send_batch(100) only, {label}", count, work)

        return measure

    try:
        print(f"pgmq's insert-notification trigger, send_batch(100) alone; {samples} samples after {warmup} warm-up:")
        rates = await interleave_async(
            {label: send(label, queue) for label, queue in queues.items()}, samples=samples, warmup=warmup
        )
        plain = rates["no trigger"]
        for label, rate in rates.items():
            print(f"  {label:<32} {rate.format('msg/s')}")
            if rate is not plain:
                print(f"  {'  / no trigger':<32} {ratio(rate, plain).format(number='{:.0%}')}")
    finally:
        await owner.execute("SELECT pgmq.drop_queue('bench_plain')")
        await owner.execute("SELECT pgmq.drop_queue('bench_unthrottled')")
        await owner.close()


def cpu_per_message(samples: int, warmup: int) -> None:
    """The client's own CPU per message, outside the database: pydantic against the json.loads raw SQL does
    (consume side), model_dump_json (publish side: raw SQL sends text it already has), and the bookkeeping
    around them (RawMessage per row, the destination queue per message). Process CPU time, so the other
    processes on a shared machine do not count."""
    messages = [request(n) for n in range(1000)]
    bodies = [m.model_dump_json() for m in messages]
    now = datetime.now(UTC)
    rows = [(n, 1, now, body, None) for n, body in enumerate(bodies)]
    work: dict[str, Callable[[], object]] = {
        "json.loads (what raw SQL does)": lambda: [json.loads(b) for b in bodies],
        "pydantic model_validate_json": lambda: [c.LlmRequest.model_validate_json(b) for b in bodies],
        "pydantic model_dump_json": lambda: [m.model_dump_json() for m in messages],
        "bookkeeping (RawMessage, queue_for)": lambda: [
            (RawMessage(*row), queue_for(message)) for row, message in zip(rows, messages, strict=True)
        ],
    }

    def per_message(job: Callable[[], object]) -> Callable[[], float]:
        def measure() -> float:
            timer = timeit.Timer(job, timer=time.process_time)
            return min(timer.repeat(repeat=3, number=5)) / (5 * len(messages)) * 1e6

        return measure

    results = interleave({label: per_message(job) for label, job in work.items()}, samples=samples, warmup=warmup)
    print(f"client CPU per message outside the database (µs, process time; {samples} samples after {warmup} warm-up):")
    for label, taken in results.items():
        print(f"  {label:<46} {taken.format('µs', '{:.1f}')}")


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


async def wake_latency(stack: ProvisionResult, samples: int, spacing: float, warmup: int = 20) -> tuple[float, float]:
    """Time from just before publish to the handler running, with the consumer asleep on NOTIFY. The first
    `warmup` messages (connections, caches) are not counted."""
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
    for n in range(warmup + samples):
        await asyncio.sleep(spacing)
        got.clear()
        start = time.perf_counter()
        await publisher.publish(request(n))
        await got.wait()
        if n >= warmup:
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
    print(f"    messages {spacing * 1000:.0f} ms apart ({samples} messages): p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return p50, p99


async def wake_latencies(stack: ProvisionResult, samples: int) -> None:
    """Runs of 300 messages at each spacing, interleaved; the median of the runs' p50s and p99s."""
    owner = stack.credentials["centralcloud"].shared_queue_url
    print(f"NOTIFY wake-up, publish → handler running (pgmq throttle {NOTIFY_THROTTLE_MS} ms per queue; a consumer")
    print(f"rereads once after it); {samples} runs of 300 messages per spacing, interleaved:")
    spacings = {"20 ms apart": 0.02, "1 ms apart": 0.001}
    p99s: dict[str, list[float]] = {label: [] for label in spacings}

    def run_at(label: str) -> Callable[[], Awaitable[float]]:
        async def measure() -> float:
            purge(owner)
            p50, p99 = await wake_latency(stack, 300, spacings[label])
            p99s[label].append(p99)
            return p50

        return measure

    p50s = await interleave_async({label: run_at(label) for label in spacings}, samples=samples, warmup=0)
    for label, p50 in p50s.items():
        print(f"  {label:<12} p50 {p50.format('ms', '{:.2f}')}")
        print(f"  {'':<12} p99 {Samples(label, p99s[label]).format('ms', '{:.2f}')}")


async def run(stack: ProvisionResult, count: int, samples: int, warmup: int) -> None:
    owner = stack.credentials["centralcloud"].shared_queue_url
    single = max(1, count // 4)  # batch 1 is about 15x slower: a quarter of the messages keeps rounds short
    print(f"publish → consume → archive; {samples} samples after {warmup} warm-up round(s), interleaved:")
    benches = {
        "raw1": lambda: raw_pgmq(stack, single, 1),
        "client1": lambda: client(stack, single, 1),
        "raw100": lambda: raw_pgmq(stack, count, 100),
        "client100": lambda: client(stack, count, 100),
        "client100i": lambda: client(stack, count, 100, idempotent=True),
    }

    def purged(bench: Callable[[], Awaitable[float]]) -> Callable[[], Awaitable[float]]:
        async def measure() -> float:
            purge(owner)
            return await bench()

        return measure

    rates = await interleave_async({name: purged(bench) for name, bench in benches.items()}, samples, warmup)
    print("medians, min-max and IQR of the samples:")
    for name, label in [
        ("raw1", "raw pgmq SQL, batch 1"),
        ("client1", "client, batch 1"),
        ("raw100", "raw pgmq SQL, batch 100"),
        ("client100", "client, batch 100"),
        ("client100i", "client, batch 100 + idempotent Consumer"),
    ]:
        print(f"  {label:<44} {rates[name].format('msg/s')}")
    print("ratios, per round (runs side by side):")
    print(f"  client / raw, batch 1: {ratio(rates['client1'], rates['raw1']).format(number='{:.0%}')}")
    print("  " + goal("client >= 80% of raw, batch 100", ratio(rates["client100"], rates["raw100"]), 0.80))
    print("  " + goal("idempotent >= 60% of plain, batch 100", ratio(rates["client100i"], rates["client100"]), 0.60))
    purge(owner)
    await notify_cost(stack, count, samples, warmup)
    cpu_per_message(samples, warmup)
    purge(owner)
    await wake_latencies(stack, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-dsn")
    parser.add_argument(
        "--messages", type=int, default=2000, help="messages per sample in batches (a quarter at batch 1)"
    )
    parser.add_argument("--samples", type=int, default=15, help="measured rounds of each comparison")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    args = parser.parse_args()
    cluster = None
    admin_dsn = args.admin_dsn
    if not admin_dsn:
        cluster = throwaway_cluster().start()
        admin_dsn = cluster.dsn()
        print(f"PostgreSQL {cluster.installation.version} ({cluster.installation.source}), fsync off, loopback")
    try:
        stack = Provisioner(admin_dsn, StackLayout(1, "bench_"), report=lambda _: None).run()
        asyncio.run(run(stack, args.messages, args.samples, args.warmup))
    finally:
        if cluster:
            cluster.stop("immediate")
            shutil.rmtree(cluster.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
