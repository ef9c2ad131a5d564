"""Nexus on one and on two processes, and the latency the stack adds over litellm's Router alone.

    .venv/bin/python bench/nexus_bench.py [--requests 400] [--concurrency 100] [--samples 5]

Two `singularity-stack run nexus` processes on one provisioned stack answer LLM requests (offline model)
that this process publishes as Singularity does and awaits on its reply queue. Rounds alternate: one
process (the other stopped with SIGSTOP, so it claims nothing) and both; the throughput ratio is taken per
round. Then one request at a time: the round trip's p50 through one Nexus beside the p50 of LlmRouter.complete
called directly in this process (litellm's Router alone), interleaved; the difference is what the queue hops,
the claims and the history writes add.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable

from samples import Samples, goal, interleave_async, ratio
from stack_bench import readyz_details, start_nexus

from singularity_stack import contract as c
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, NotifyListener, SharedQueue
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.singularity.waiter import ReplyWaiter
from singularity_stack.topology import StackLayout, reply_queue
from singularity_stack_testing.postgres import throwaway_cluster


class Requester:
    """Singularity's side: publish LlmRequests, await each LlmResult on singularity_1's reply queue."""

    def __init__(self, stack: ProvisionResult) -> None:
        self.url = stack.credentials["singularity_1"].shared_queue_url
        self.database_url = stack.credentials["singularity_1"].database_url
        self.waiter = ReplyWaiter()
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Requester:
        queue = reply_queue("llm_results", "singularity_1")
        self.client = await SharedQueue(self.url, max_size=8).open()
        self.pool = connection_pool(self.database_url, max_size=2)
        await self.pool.open(wait=True)
        listener = NotifyListener(self.url, [queue])

        async def deliver(delivery: Delivery[c.LlmResult]) -> None:
            reply = delivery.message
            delivery.after_commit(lambda: self.waiter.resolve(reply))

        consumer = Consumer(
            self.client,
            queue,
            c.LlmResult,
            deliver,
            store=IdempotencyStore(self.pool),
            batch_size=100,
            wakeup=listener.event(queue),
        )
        self.tasks = [asyncio.create_task(listener.run()), asyncio.create_task(consumer.run(self.stop))]
        await listener.connected.wait()
        return self

    async def __aexit__(self, *_: object) -> None:
        self.stop.set()
        await self.tasks[1]
        self.tasks[0].cancel()
        await self.client.close()
        await self.pool.close()

    async def ask(self, n: int) -> float:
        request = c.LlmRequest(
            reply_to="singularity_1",
            agent_id="bench",
            task_type="chat",
            messages=[{"role": "user", "content": f"q {n}"}],
        )
        started = time.perf_counter()
        future = self.waiter.expect(request.request_id)
        await self.client.publish(request)
        reply = await asyncio.wait_for(future, 120)
        assert isinstance(reply, c.LlmResult) and reply.error is None, reply
        return (time.perf_counter() - started) * 1000

    async def throughput(self, total: int, concurrency: int) -> float:
        slots = asyncio.Semaphore(concurrency)

        async def one(n: int) -> None:
            async with slots:
                await self.ask(n)

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(total)))
        return total / (time.perf_counter() - started)


async def scaling(stack: ProvisionResult, second: subprocess.Popen[bytes], total: int, concurrency: int, samples: int):
    async with Requester(stack) as requester:

        def with_processes(count: int) -> Callable[[], Awaitable[float]]:
            async def measure() -> float:
                second.send_signal(signal.SIGCONT if count == 2 else signal.SIGSTOP)
                rate = await requester.throughput(total, concurrency)
                print(f"    {count} Nexus: {rate:,.0f} requests/s", flush=True)
                return rate

            return measure

        print(f"LLM round trips, {concurrency} in flight; {samples} samples of {total} per mode after a warm-up:")
        rates = await interleave_async({"one": with_processes(1), "two": with_processes(2)}, samples=samples)
        second.send_signal(signal.SIGCONT)
    print(f"  1 Nexus process    {rates['one'].format('requests/s')}")
    print(f"  2 Nexus processes  {rates['two'].format('requests/s')}")
    print("  " + goal("2 processes >= 1.7x one", ratio(rates["two"], rates["one"]), 1.7, number="{:.2f}x"))


async def added_latency(stack: ProvisionResult, second: subprocess.Popen[bytes], calls: int, samples: int) -> None:
    from singularity_stack.nexus.router import LlmRouter

    second.send_signal(signal.SIGSTOP)  # one Nexus answers: the figure is per request, not per process
    router = LlmRouter()
    messages = [{"role": "user", "content": "question"}]
    async with Requester(stack) as requester:

        async def through_nexus() -> float:
            return statistics.median([await requester.ask(n) for n in range(calls)])

        async def router_alone() -> float:
            latencies = []
            for _ in range(calls):
                started = time.perf_counter()
                await router.complete("chat", messages)
                latencies.append((time.perf_counter() - started) * 1000)
            return statistics.median(latencies)

        print(f"One request at a time; {samples} samples of {calls} calls each after a warm-up, p50 per sample:")
        p50 = await interleave_async({"stack": through_nexus, "router": router_alone}, samples=samples)
    second.send_signal(signal.SIGCONT)
    added = Samples("added", [a - b for a, b in zip(p50["stack"].values, p50["router"].values, strict=True)])
    print(f"  through Nexus (queue hops, claims, history)  {p50['stack'].format('ms', '{:.1f}')}")
    print(f"  litellm's Router alone                       {p50['router'].format('ms', '{:.1f}')}")
    print("  " + goal("the stack adds <= 4 ms at p50", added, 4.0, at_least=False, number="{:.1f} ms"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="LLM requests per throughput sample")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--calls", type=int, default=50, help="requests per latency sample")
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    cluster = throwaway_cluster().start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        print(f"PostgreSQL {cluster.installation.version}, fsync off, loopback; {os.cpu_count()} cores")
        stack = Provisioner(cluster.dsn(), StackLayout(1), report=lambda _: None).run()
        started = [start_nexus(stack) for _ in range(2)]
        processes = [process for process, _ in started]
        for _, port in started:  # ready comes before litellm is loaded: wait until each can route
            while readyz_details(port).get("llm_router") != "ready":
                time.sleep(0.1)
        asyncio.run(scaling(stack, processes[1], args.requests, args.concurrency, args.samples))
        asyncio.run(added_latency(stack, processes[1], args.calls, args.samples))
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(30)
        cluster.stop("immediate")
        shutil.rmtree(cluster.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
