"""Shared-queue benchmark: the client against raw pgmq SQL on the same server, what pgmq's notification
trigger costs, the client's CPU per message outside the database, and NOTIFY wake-up latency.

    .venv/bin/python bench/queue_bench.py [--admin-dsn DSN] [--messages 2000] [--samples 15] [--warmup 1]
        [--wake-runs 3] [--only throughput|trigger|cpu|wake ...]

Without --admin-dsn it starts a throwaway local PostgreSQL (fsync off, as in the tests).
Every throughput figure is publish → consume → archive of the same small LlmRequest. The runs compared are
interleaved (A, B, A, B ...) after warm-up rounds (bench/samples.py): a ratio is taken per round, from runs
made side by side, and shown as the median with its spread, because a shared 2-core VM is noisy. Samples are
short (a second or less) and many: the load of a shared machine changes over seconds, so two runs a second
apart see nearly the same machine, and the median of many rounds drops the rounds a burst of load split.
The wake-up is measured beside pgmq's own NOTIFY on a plain connection for the same messages, and beside a
raw `pgmq.read` sent the moment that notification arrives: the least any consumer woken by NOTIFY pays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import time
import timeit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
    headers = json.dumps({"sender": "singularity_1", "sender_role": "bench_singularity_1"})
    rows = [(n, 1, now, body, headers, "singularity_1") for n, body in enumerate(bodies)]
    work: dict[str, Callable[[], object]] = {
        "json.loads (what raw SQL does)": lambda: [json.loads(b) for b in bodies],
        "pydantic model_validate_json": lambda: [c.LlmRequest.model_validate_json(b) for b in bodies],
        "pydantic model_dump_json": lambda: [m.model_dump_json() for m in messages],
        "bookkeeping (RawMessage, queue_for)": lambda: [
            (RawMessage._make(row), queue_for(message)) for row, message in zip(rows, messages, strict=True)
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
            await (consumer.run_once(begin_early=True) if idempotent else consume_plain())

    label = f"client, batch {batch}" + (" + idempotent Consumer" if idempotent else "")
    try:
        return await timed(label, count, work)
    finally:
        await publisher.close()
        await reader.close()
        await pool.close()


def percentile(values: list[float], share: float) -> float:
    """The value `share` of the way up the sorted values (p99 of 300: the 297th), as the bench always took it."""
    ordered = sorted(values)
    return ordered[max(int(len(ordered) * share) - 1, 0)]


class PlainListener:
    """pgmq's own NOTIFY on a plain connection that LISTENs and does nothing else: the reference a wake-up is
    measured against. `arrived` is when the first notification after `expect()` came in (None: none yet)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.arrived: float | None = None
        self.came = asyncio.Event()
        self.connected = asyncio.Event()

    def expect(self) -> None:
        self.arrived = None
        self.came.clear()

    async def run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(f'LISTEN "pgmq.q_{QUEUE}.INSERT"')
            self.connected.set()
            async for _ in conn.notifies():
                if self.arrived is None:
                    self.arrived = time.perf_counter()
                    self.came.set()

    async def wait(self, seconds: float) -> None:
        """Give a notification that has not come yet up to `seconds` (none comes for a throttled insert)."""
        if self.arrived is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.came.wait(), seconds)


@dataclass
class WakeRun:
    """One run's latencies from just before publish, in ms: pgmq's NOTIFY on a plain connection, and what the
    run measured (the handler running, or a raw read's rows back), for the messages pgmq notified."""

    notify: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)
    unnotified: list[float] = field(default_factory=list)  # measured, for inserts inside the throttle window


async def wake_latency(stack: ProvisionResult, samples: int, spacing: float, warmup: int = 20) -> WakeRun:
    """Time from just before publish to the handler running, with the consumer asleep on NOTIFY, beside a plain
    connection's NOTIFY for the same message. The first `warmup` messages (connections, caches) do not count."""
    publisher = await SharedQueue(stack.credentials["singularity_1"].shared_queue_url, max_size=1).open()
    reader = await SharedQueue(stack.credentials["nexus"].shared_queue_url, max_size=2).open()
    listener = NotifyListener(stack.credentials["nexus"].shared_queue_url, [QUEUE])
    plain = PlainListener(stack.credentials["nexus"].shared_queue_url)
    got = asyncio.Event()
    handled_at = 0.0

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        nonlocal handled_at
        handled_at = time.perf_counter()
        got.set()

    pool = connection_pool(stack.credentials["nexus"].database_url, max_size=2)
    await pool.open(wait=True)
    store = IdempotencyStore(pool)
    consumer = Consumer(
        reader, QUEUE, c.LlmRequest, handle, store=store, poll_interval=3600, wakeup=listener.event(QUEUE)
    )
    stop = asyncio.Event()
    listening = [asyncio.create_task(listener.run()), asyncio.create_task(plain.run())]
    await listener.connected.wait()
    await plain.connected.wait()
    consuming = asyncio.create_task(consumer.run(stop))
    run = WakeRun()
    for n in range(warmup + samples):
        got.clear()
        plain.expect()
        start = time.perf_counter()
        await publisher.publish(request(n))
        await got.wait()
        waited = time.perf_counter()
        await plain.wait(spacing)
        await asyncio.sleep(max(spacing - (time.perf_counter() - waited), 0))
        if n < warmup:
            continue
        if plain.arrived is None:
            run.unnotified.append((handled_at - start) * 1000)
        else:
            run.notify.append((plain.arrived - start) * 1000)
            run.measured.append((handled_at - start) * 1000)
    stop.set()
    await consuming
    for task in listening:
        task.cancel()
    await publisher.close()
    await reader.close()
    await pool.close()
    return run


async def raw_read_after_notify(stack: ProvisionResult, samples: int, spacing: float, warmup: int = 20) -> WakeRun:
    """The least any consumer woken by NOTIFY can do: a plain connection LISTENs and, the moment pgmq's
    notification arrives, a second one sends `pgmq.read` (raw SQL, no pool, no validation); timed to its rows."""
    url = stack.credentials["nexus"].shared_queue_url
    publisher = await SharedQueue(stack.credentials["singularity_1"].shared_queue_url, max_size=1).open()
    plain = PlainListener(url)
    listening = asyncio.create_task(plain.run())
    await plain.connected.wait()
    run = WakeRun()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as reader:
        for n in range(warmup + samples):
            plain.expect()
            start = time.perf_counter()
            await publisher.publish(request(n))
            await plain.wait(0.05)
            notified = plain.arrived
            cur = await reader.execute("SELECT msg_id, message::text FROM pgmq.read(%s, 30, 100)", (QUEUE,))
            rows = await cur.fetchall()
            read_at = time.perf_counter()
            await reader.execute("SELECT pgmq.archive(%s, %s::bigint[])", (QUEUE, [row[0] for row in rows]))
            await asyncio.sleep(spacing)
            if n >= warmup and notified is not None and rows:
                run.notify.append((notified - start) * 1000)
                run.measured.append((read_at - start) * 1000)
    listening.cancel()
    await publisher.close()
    return run


WAKE_P50_GOAL_MS = 0.5  # handler running at most this long after pgmq's NOTIFY arrives, at p50
WAKE_P99_GOAL_MS = 2.0  # and at p99


async def wake_latencies(stack: ProvisionResult, runs: int) -> None:
    """Runs of 300 messages at each spacing, the consumer's and the raw read's interleaved; per run the p50
    and p99 of each latency and of its excess over pgmq's own NOTIFY in the same run; medians of the runs."""
    owner = stack.credentials["centralcloud"].shared_queue_url
    print(f"NOTIFY wake-up (pgmq throttle {NOTIFY_THROTTLE_MS} ms per queue): publish → handler running, beside")
    print("pgmq's own NOTIFY (publish → notification on a plain LISTEN connection) for the same messages, and a")
    print(f"raw pgmq.read sent the moment that notification arrives; {runs} runs of 300 messages each, interleaved:")
    spacings = {"20 ms apart": 0.02, "1 ms apart": 0.001}
    kinds = {"consumer": wake_latency, "raw read": raw_read_after_notify}
    taken: dict[tuple[str, str], list[WakeRun]] = {(s, k): [] for s in spacings for k in kinds}

    def run_one(spacing: str, kind: str) -> Callable[[], Awaitable[float]]:
        async def measure() -> float:
            purge(owner)
            run = await kinds[kind](stack, 300, spacings[spacing])
            taken[spacing, kind].append(run)
            return 0.0

        return measure

    await interleave_async({f"{s} {k}": run_one(s, k) for s in spacings for k in kinds}, samples=runs, warmup=0)

    def per_run(runs_: list[WakeRun], share: float, of: Callable[[WakeRun], list[float]]) -> Samples:
        return Samples("", [percentile(of(r), share) for r in runs_ if of(r)])

    for spacing in spacings:
        consumer, raw = taken[spacing, "consumer"], taken[spacing, "raw read"]
        print(f"  messages {spacing}:")
        for share, name, target in [(0.5, "p50", WAKE_P50_GOAL_MS), (0.99, "p99", WAKE_P99_GOAL_MS)]:
            notify = per_run(consumer, share, lambda r: r.notify)
            handled = per_run(consumer, share, lambda r: r.measured)
            raw_notify = per_run(raw, share, lambda r: r.notify)
            raw_read = per_run(raw, share, lambda r: r.measured)
            excess = Samples("", [h - n for h, n in zip(handled.values, notify.values, strict=True)])
            raw_excess = Samples("", [h - n for h, n in zip(raw_read.values, raw_notify.values, strict=True)])
            print(f"    {name} pgmq NOTIFY on a plain connection     {notify.format('ms', '{:.2f}')}")
            print(f"    {name} handler running (the Consumer)         {handled.format('ms', '{:.2f}')}")
            print("    " + goal(f"{name} handler within {target} ms of NOTIFY", excess, target, False, "+{:.2f} ms"))
            print(f"    {name} raw pgmq.read after NOTIFY, its rows   {raw_read.format('ms', '{:.2f}')}")
            print(f"    {name}   of which after NOTIFY (the floor)   {raw_excess.format('ms', '+{:.2f}')}")
        skipped = [len(r.unnotified) for r in consumer]
        late = [percentile(r.unnotified, 0.5) for r in consumer if r.unnotified]
        note = f", their handler p50 {statistics.median(late):.2f} ms" if late else ""
        print(f"    inserts pgmq sent no NOTIFY for (inside the throttle window), per run: {skipped}{note}")


async def throughput(stack: ProvisionResult, count: int, samples: int, warmup: int) -> None:
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
    print("  " + goal("client >= 90% of raw, batch 100", ratio(rates["client100"], rates["raw100"]), 0.90))
    print("  " + goal("idempotent >= 60% of plain, batch 100", ratio(rates["client100i"], rates["client100"]), 0.60))


PARTS = ("throughput", "trigger", "cpu", "wake")


async def run(stack: ProvisionResult, parts: list[str], count: int, samples: int, warmup: int, runs: int) -> None:
    owner = stack.credentials["centralcloud"].shared_queue_url
    for part in parts:
        purge(owner)
        if part == "throughput":
            await throughput(stack, count, samples, warmup)
        elif part == "trigger":
            await notify_cost(stack, count, samples, warmup)
        elif part == "cpu":
            cpu_per_message(samples, warmup)
        else:
            await wake_latencies(stack, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-dsn")
    parser.add_argument(
        "--messages", type=int, default=2000, help="messages per sample in batches (a quarter at batch 1)"
    )
    parser.add_argument("--samples", type=int, default=15, help="measured rounds of each comparison")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    parser.add_argument("--wake-runs", type=int, default=3, help="runs of 300 messages per wake-up measurement")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    args = parser.parse_args()
    cluster = None
    admin_dsn = args.admin_dsn
    if not admin_dsn:
        cluster = throwaway_cluster().start()
        admin_dsn = cluster.dsn()
        print(f"PostgreSQL {cluster.installation.version} ({cluster.installation.source}), fsync off, loopback")
    try:
        stack = Provisioner(admin_dsn, StackLayout(1, "bench_"), report=lambda _: None).run()
        asyncio.run(run(stack, args.only or list(PARTS), args.messages, args.samples, args.warmup, args.wake_runs))
    finally:
        if cluster:
            cluster.stop("immediate")
            shutil.rmtree(cluster.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
