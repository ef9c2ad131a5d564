"""Service benchmarks: the LLM round trip through a real Nexus process, and Genesis's sandbox overhead.

    .venv/bin/python bench/stack_bench.py [--requests 1000] [--concurrency 100] [--jobs 40]

LLM: Singularity's side (publish an LlmRequest, await the LlmResult on its own reply queue) against
`singularity-stack run nexus` answering with the offline model, `--concurrency` requests in flight.
Genesis: trivial Python jobs through the sandboxed runner (syntax check, lint, run: three sandboxes
per job) next to spawning the same interpreter bare, both with two at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

from singularity_stack import contract as c
from singularity_stack.postgres.cluster import free_port
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, NotifyListener, SharedQueue
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.singularity.waiter import ReplyWaiter
from singularity_stack.topology import StackLayout, reply_queue
from singularity_stack_testing.postgres import throwaway_cluster


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def start_nexus(stack: ProvisionResult) -> tuple[subprocess.Popen[bytes], int]:
    creds = stack.credentials["nexus"]
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": creds.database_url,
        "SHARED_QUEUE_DB_URL": creds.shared_queue_url,
        "PORT": str(port),
        "NEXUS_UI_TOKEN": "bench-token-0123456789",
        "LOG_LEVEL": "WARNING",
        "NEXUS_MAX_CONCURRENT_LLM": "32",
    }
    process = subprocess.Popen([sys.executable, "-m", "singularity_stack.cli", "run", "nexus"], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("nexus did not become ready")


async def llm_round_trips(stack: ProvisionResult, total: int, concurrency: int) -> None:
    url = stack.credentials["singularity_1"].shared_queue_url
    queue = reply_queue("llm_results", "singularity_1")
    client = await SharedQueue(url, max_size=8).open()
    waiter = ReplyWaiter()
    listener = NotifyListener(url, [queue])

    pool = connection_pool(stack.credentials["singularity_1"].database_url, max_size=2)
    await pool.open(wait=True)

    async def deliver(delivery: Delivery[c.LlmResult]) -> None:
        reply = delivery.message
        delivery.after_commit(lambda: waiter.resolve(reply))  # as Singularity does

    consumer = Consumer(
        client, queue, c.LlmResult, deliver, store=IdempotencyStore(pool), batch_size=100, wakeup=listener.event(queue)
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(listener.run()), asyncio.create_task(consumer.run(stop))]
    await listener.connected.wait()
    latencies: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with slots:
            request = c.LlmRequest(
                reply_to="singularity_1",
                agent_id="bench",
                task_type="chat",
                messages=[{"role": "user", "content": f"question {n}"}],
            )
            started = time.perf_counter()
            future = waiter.expect(request.request_id)
            await client.publish(request)
            reply = await asyncio.wait_for(future, 120)
            assert isinstance(reply, c.LlmResult) and reply.error is None, reply
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(one(n) for n in range(min(concurrency, total))))  # warm-up: imports, pools
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(total)))
    elapsed = time.perf_counter() - started
    stop.set()
    await tasks[1]
    tasks[0].cancel()
    await client.close()
    await pool.close()
    latencies.sort()
    print(
        f"  LLM round trip, {concurrency} in flight: {total / elapsed:,.0f} requests/s   "
        f"p50 {statistics.median(latencies):.1f} ms   p99 {percentile(latencies, 0.99):.1f} ms   "
        f"({total:,} requests in {elapsed:.1f} s)"
    )


async def genesis_overhead(jobs: int) -> None:
    from singularity_stack.genesis.runner import JobRunner

    runner = JobRunner(max_concurrent=2)
    await runner.run("print(1)", "python")  # warm-up
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(runner.run("print(1)", "python") for _ in range(jobs)))
    sandboxed = time.perf_counter() - started
    assert all(o.status == "ok" for o in outcomes), outcomes[0]

    slots = asyncio.Semaphore(2)

    async def bare() -> None:
        async with slots:
            process = await asyncio.create_subprocess_exec(
                "/usr/bin/python3", "-c", "print(1)", stdout=subprocess.DEVNULL
            )
            await process.wait()

    started = time.perf_counter()
    await asyncio.gather(*(bare() for _ in range(jobs)))
    plain = time.perf_counter() - started
    print(f"  Genesis, trivial Python job (syntax + lint + run, sandboxed): {jobs / sandboxed:,.1f} jobs/s")
    print(f"  bare /usr/bin/python3 -c 'print(1)', same concurrency:       {jobs / plain:,.1f} spawns/s")
    print(f"  sandbox overhead: {sandboxed / plain:.1f}x the bare interpreter per job (three sandboxes per job)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=40)
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    cluster = throwaway_cluster().start()
    nexus = None
    try:
        print(f"PostgreSQL {cluster.installation.version}, fsync off, loopback; {os.cpu_count()} cores")
        stack = Provisioner(cluster.dsn(), StackLayout(1), report=lambda _: None).run()
        nexus, _ = start_nexus(stack)
        asyncio.run(llm_round_trips(stack, args.requests, args.concurrency))
        asyncio.run(genesis_overhead(args.jobs))
    finally:
        if nexus:
            nexus.terminate()
            nexus.wait(30)
        cluster.stop("immediate")
        shutil.rmtree(cluster.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
