"""Dual operation's two paths side by side: a request's round trip on NATS JetStream against the same on pgmq.

    .venv/bin/python bench/nats_bench.py [--admin-dsn DSN] [--round-trips 50] [--samples 9] [--warmup 1]

Without --admin-dsn it starts a throwaway local PostgreSQL (fsync off, as in the tests); nats-server (Debian's,
JetStream on file storage) is started with the stack's users (sharedqueue/nats_permissions.py). One round
trip: an instance publishes an LlmRequest, Nexus's side handles it (claim in its database, reply on the
path the request came by) and the instance's reply consumer hands the reply to the waiting caller, as
Singularity's workflow waits. The pgmq path: SharedQueue.publish → Consumer (woken by NOTIFY) → reply
queue → Consumer; the NATS path: NatsRequests.publish → NatsReader → NatsReplies (JetStream, plus the
reply's pgmq archive row) → NatsReader. Every reader and consumer handles one message at a time (batch 1),
so each figure is latency, not throughput. A sample is `--round-trips` sequential round trips; the rounds
interleave pgmq and NATS (bench/samples.py), and the ratio is per round.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import uuid
from typing import Any

from samples import Samples, interleave_async, ratio, seconds_async

from singularity_stack import contract as c
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult
from singularity_stack.sharedqueue import (
    Consumer,
    Delivery,
    IdempotencyStore,
    NotifyListener,
    SharedQueue,
    nats_permissions,
)
from singularity_stack.sharedqueue.nats_connection import connect
from singularity_stack.sharedqueue.nats_reader import NatsReader
from singularity_stack.sharedqueue.nats_replies import NatsReplies, ReplyRouter
from singularity_stack.sharedqueue.nats_requests import NatsRequests
from singularity_stack.sharedqueue.nats_streams import ensure_streams
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.topology import StackLayout
from singularity_stack_testing.nats import NatsServer
from singularity_stack_testing.postgres import throwaway_cluster

REPLIES = "llm_results_singularity_1"


def request() -> c.LlmRequest:
    return c.LlmRequest(
        reply_to="singularity_1", agent_id="bench", task_type="chat", messages=[{"role": "user", "content": "hi"}]
    )


class Bench:
    def __init__(self, stack: ProvisionResult, server: NatsServer, passwords: dict[str, str]) -> None:
        self.stack = stack
        self.server = server
        self.passwords = passwords
        self.layout = stack.layout
        self.waiting: dict[uuid.UUID, asyncio.Future[None]] = {}
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.closers: list[Any] = []

    async def start(self) -> None:
        creds = self.stack.credentials
        owner = await connect(self.server.url, self.layout, "centralcloud", self.passwords["centralcloud"])
        await ensure_streams(owner.jetstream(), self.layout)
        await owner.close()
        nexus_q, inst_q = (
            SharedQueue(creds["nexus"].shared_queue_url),
            SharedQueue(creds["singularity_1"].shared_queue_url),
        )
        await nexus_q.open()
        await inst_q.open()
        nexus_db = connection_pool(creds["nexus"].database_url, max_size=4)
        inst_db = connection_pool(creds["singularity_1"].database_url, max_size=4)
        await nexus_db.open(wait=True)
        await inst_db.open(wait=True)
        self.closers += [nexus_q.close, inst_q.close, nexus_db.close, inst_db.close]
        nexus_nc = await connect(self.server.url, self.layout, "nexus", self.passwords["nexus"])
        self.inst_nc = await connect(self.server.url, self.layout, "singularity_1", self.passwords["singularity_1"])
        self.closers += [nexus_nc.close, self.inst_nc.close]
        self.inst_q = inst_q
        self.requests = NatsRequests(self.inst_nc.jetstream(), self.layout, "singularity_1")
        router = ReplyRouter(nexus_q, NatsReplies(nexus_nc.jetstream(), self.layout, nexus_q))

        async def answer(delivery: Delivery[Any]) -> None:
            assert delivery.sender is not None
            await router.send(
                delivery, c.LlmResult(request_id=delivery.message.request_id, recipient=delivery.sender, result="ok")
            )

        async def arrived(delivery: Delivery[Any]) -> None:
            future = self.waiting.pop(delivery.message.request_id, None)
            if future is not None:
                delivery.after_commit(lambda: future.set_result(None))

        nexus_store, inst_store = IdempotencyStore(nexus_db), IdempotencyStore(inst_db)
        consumers = [
            Consumer(nexus_q, "llm_requests", c.LlmRequest, answer, store=nexus_store, batch_size=1),
            Consumer(inst_q, REPLIES, c.LlmResult, arrived, store=inst_store, batch_size=1),
        ]
        listener = NotifyListener(creds["centralcloud"].shared_queue_url, [cons.queue for cons in consumers])
        for consumer in consumers:
            consumer.wakeup = listener.event(consumer.queue)
        readers = [
            NatsReader(
                nexus_nc,
                self.layout,
                "nexus",
                "llm_requests",
                c.LlmRequest,
                answer,
                client=nexus_q,
                store=nexus_store,
                batch_size=1,
                fetch_timeout=1.0,
            ),
            NatsReader(
                self.inst_nc,
                self.layout,
                "singularity_1",
                REPLIES,
                c.LlmResult,
                arrived,
                client=inst_q,
                store=inst_store,
                batch_size=1,
                fetch_timeout=1.0,
            ),
        ]
        self.listener_task = asyncio.create_task(listener.run())
        await asyncio.wait_for(listener.connected.wait(), 10)
        self.tasks = [asyncio.create_task(worker.run(self.stop)) for worker in [*consumers, *readers]]

    async def round_trip(self, path: str) -> None:
        message = request()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[message.request_id] = future
        if path == "pgmq":
            await self.inst_q.publish(message)
        else:
            await self.requests.publish(message)
        await asyncio.wait_for(future, 30)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.listener_task.cancel()
        await asyncio.gather(self.listener_task, return_exceptions=True)
        for close in reversed(self.closers):
            await close()


async def run(stack: ProvisionResult, round_trips: int, samples: int, warmup: int) -> None:
    passwords = {logical: secrets.token_urlsafe(18) for logical in stack.layout.owners}
    with NatsServer(nats_permissions.users(stack.layout, passwords)) as server:
        bench = Bench(stack, server, passwords)
        await bench.start()
        try:

            def many(path: str) -> Any:
                async def work() -> None:
                    for _ in range(round_trips):
                        await bench.round_trip(path)

                return seconds_async(work)

            results = await interleave_async({"pgmq": many("pgmq"), "nats": many("nats")}, samples, warmup)
        finally:
            await bench.close()
    per_trip = {name: [v / round_trips * 1000 for v in s.values] for name, s in results.items()}
    pgmq, nats = Samples("pgmq", per_trip["pgmq"]), Samples("nats", per_trip["nats"])
    print(f"round trip, {round_trips} sequential per sample, interleaved rounds:")
    print(f"  pgmq path: {pgmq.format('ms', '{:.2f}')}")
    print(f"  NATS path: {nats.format('ms', '{:.2f}')}")
    print(f"  NATS / pgmq, per round: {ratio(nats, pgmq).format(number='{:.2f}x')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-dsn")
    parser.add_argument("--round-trips", type=int, default=50)
    parser.add_argument("--samples", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    cluster = None
    admin_dsn = args.admin_dsn
    if not admin_dsn:
        cluster = throwaway_cluster().start()
        admin_dsn = cluster.dsn()
        print(f"PostgreSQL {cluster.installation.version} ({cluster.installation.source}), fsync off, loopback")
    try:
        stack = Provisioner(admin_dsn, StackLayout(1, "bench_"), report=lambda _: None).run()
        asyncio.run(run(stack, args.round_trips, args.samples, args.warmup))
    finally:
        if cluster:
            cluster.stop("immediate")
            shutil.rmtree(cluster.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
