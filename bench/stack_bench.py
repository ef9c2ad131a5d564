"""Service benchmarks: Nexus's start-up, the LLM round trip through a real Nexus process, litellm's Router
CPU per call, and Genesis's sandbox overhead.

    .venv/bin/python bench/stack_bench.py [--requests 400] [--concurrency 100] [--jobs 20] [--samples 5]

Start-up: a Nexus process from spawn to /readyz answering 200 and to its LLM router loaded (litellm is
imported in the background), beside a bare `python -c "import litellm"`, interleaved.
LLM: Singularity's side (publish an LlmRequest, await the LlmResult on its own reply queue) against
`singularity-stack run nexus` answering with the offline model, `--concurrency` requests in flight; each
sample is `--requests` requests, after a warm-up round, and also counts the Nexus process's CPU time.
Router: Nexus's LlmRouter alone in this process (offline model), CPU time per call, one at a time and
`--concurrency` at a time, interleaved.
Genesis: trivial Python jobs through the sandboxed runner (lint and run in one sandbox per job) and the same
interpreter spawned bare, both two at a time, interleaved (sandboxed, bare, sandboxed, bare ...) after a
warm-up round of each; the overhead is taken per round from the two runs side by side. Then, per language,
the job latency one at a time beside the bare interpreter, with issue 14's goals (bench/genesis_bench.py,
which also runs alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable

from genesis_bench import CASES as GENESIS_CASES
from genesis_bench import measure as genesis_latency
from samples import Samples, goal, interleave_async, ratio

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


def start_nexus(stack: ProvisionResult, poll: float = 0.2) -> tuple[subprocess.Popen[bytes], int]:
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
            time.sleep(poll)
    process.kill()
    raise RuntimeError("nexus did not become ready")


def nexus_startup(stack: ProvisionResult, samples: int) -> None:
    """`singularity-stack run nexus` from spawn to /readyz 200 and to its router loaded (details.llm_router),
    beside `python -c "import litellm"`, interleaved (Nexus, import, Nexus, import ...)."""
    ready, loaded, imports = [], [], []
    for round_ in range(samples + 1):
        started = time.perf_counter()
        process, port = start_nexus(stack, poll=0.02)
        ready.append(time.perf_counter() - started)
        while readyz_details(port).get("llm_router") != "ready":
            time.sleep(0.02)
        loaded.append(time.perf_counter() - started)
        process.terminate()
        process.wait(30)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import litellm"], check=True)
        imports.append(time.perf_counter() - started)
        if round_ == 0:  # warm-up: the page cache
            ready.clear(), loaded.clear(), imports.clear()
    print(f"Nexus start-up, {samples} samples after a warm-up, interleaved with a bare `import litellm`:")
    ready_s, loaded_s, import_s = Samples("ready", ready), Samples("loaded", loaded), Samples("import", imports)
    print(f"  spawn -> /readyz 200              {ready_s.format('s', '{:.2f}')}")
    print(f"  spawn -> LLM router loaded        {loaded_s.format('s', '{:.2f}')}")
    print(f"  python -c 'import litellm'        {import_s.format('s', '{:.2f}')}")
    print(f"  {goal('ready <= 2 s', ready_s, 2.0, at_least=False, number='{:.2f} s')}")


def readyz_details(port: int) -> dict[str, str]:
    """/readyz's details; {} while it does not answer within 5 s (litellm's import in its worker thread
    holds the GIL for long stretches on a busy machine)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            details: dict[str, str] = json.load(response).get("details", {})
            return details
    except OSError:
        return {}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def llm_round_trips(stack: ProvisionResult, nexus_pid: int, total: int, concurrency: int, samples: int) -> None:
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

    p50s: list[float] = []
    p99s: list[float] = []
    nexus_cpu: list[float] = []

    async def measure() -> float:
        latencies.clear()
        cpu_before = cpu_seconds(nexus_pid)
        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(total)))
        elapsed = time.perf_counter() - started
        nexus_cpu.append((cpu_seconds(nexus_pid) - cpu_before) / total * 1000)
        latencies.sort()
        p50s.append(statistics.median(latencies))
        p99s.append(percentile(latencies, 0.99))
        print(
            f"    {total / elapsed:,.0f} requests/s   p50 {p50s[-1]:.1f} ms   p99 {p99s[-1]:.1f} ms   "
            f"Nexus CPU {nexus_cpu[-1]:.1f} ms per request   ({total:,} requests in {elapsed:.1f} s)",
            flush=True,
        )
        return total / elapsed

    print(f"LLM round trip through Nexus, {concurrency} in flight; {samples} samples of {total} after a warm-up:")
    rates = (await interleave_async({"rate": measure}, samples=samples, warmup=1))["rate"]
    # measure() also ran for the warm-up round: the first entry of each list is the warm-up's.
    stop.set()
    await tasks[1]
    tasks[0].cancel()
    await client.close()
    await pool.close()
    print(f"  throughput   {rates.format('requests/s')}")
    print(f"  p50          {Samples('p50', p50s[1:]).format('ms')}")
    print(f"  p99          {Samples('p99', p99s[1:]).format('ms')}")
    print(f"  Nexus CPU    {Samples('cpu', nexus_cpu[1:]).format('ms per request', '{:.1f}')}")


async def router_cpu(concurrency: int, calls: int, samples: int) -> None:
    """litellm's Router as Nexus uses it (LlmRouter, packaged routing config, offline model), alone in this
    process: CPU time per call, one call at a time and `concurrency` at a time."""
    from singularity_stack.nexus.router import LlmRouter

    router = LlmRouter()
    messages = [{"role": "user", "content": "question"}]

    def batch(in_flight: int) -> Callable[[], Awaitable[float]]:
        async def measure() -> float:
            slots = asyncio.Semaphore(in_flight)

            async def one() -> None:
                async with slots:
                    await router.complete("chat", messages)

            cpu_before = time.process_time()
            await asyncio.gather(*(one() for _ in range(calls)))
            return (time.process_time() - cpu_before) / calls * 1000

        return measure

    modes = {"one at a time": batch(1), f"{concurrency} in flight": batch(concurrency)}
    print(
        f"litellm Router alone (LlmRouter.complete, offline model); {samples} samples of {calls} calls after a warm-up:"
    )
    results = await interleave_async(modes, samples=samples, warmup=1)
    for label, taken in results.items():
        print(f"  CPU per call, {label:<16} {taken.format('ms', '{:.2f}')}")


async def genesis_overhead(jobs: int, samples: int) -> None:
    from singularity_stack.genesis.runner import JobRunner

    runner = JobRunner(max_concurrent=2)
    slots = asyncio.Semaphore(2)

    async def sandboxed() -> float:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(runner.run("print(1)", "python") for _ in range(jobs)))
        elapsed = time.perf_counter() - started
        assert all(o.status == "ok" for o in outcomes), outcomes[0]
        return jobs / elapsed

    async def spawn() -> None:
        async with slots:
            process = await asyncio.create_subprocess_exec(
                "/usr/bin/python3", "-c", "print(1)", stdout=subprocess.DEVNULL
            )
            await process.wait()

    async def bare() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(spawn() for _ in range(jobs)))
        return jobs / (time.perf_counter() - started)

    print(
        f"Genesis against a bare interpreter, two at a time; {samples} samples of {jobs} after a warm-up, interleaved:"
    )
    rates = await interleave_async({"sandboxed": sandboxed, "bare": bare}, samples=samples, warmup=1)
    overhead = ratio(rates["bare"], rates["sandboxed"], "overhead")  # time per sandboxed job / time per bare spawn
    for label, figure in [
        ("trivial Python job, sandboxed (lint + run)", rates["sandboxed"].format("jobs/s", "{:.1f}")),
        ("bare /usr/bin/python3 -c 'print(1)'", rates["bare"].format("spawns/s", "{:.1f}")),
        ("sandboxed job / bare interpreter, per round", overhead.format("x", "{:.1f}")),
    ]:
        print(f"  {label:<52} {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="LLM requests per sample")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--router-calls", type=int, default=200, help="Router calls per sample")
    parser.add_argument("--jobs", type=int, default=20, help="Genesis jobs (and bare spawns) per sample")
    parser.add_argument("--samples", type=int, default=5, help="measured rounds of each figure")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    cluster = throwaway_cluster().start()
    nexus = None
    try:
        print(f"PostgreSQL {cluster.installation.version}, fsync off, loopback; {os.cpu_count()} cores")
        stack = Provisioner(cluster.dsn(), StackLayout(1), report=lambda _: None).run()
        nexus_startup(stack, args.samples)
        nexus, _ = start_nexus(stack)
        asyncio.run(llm_round_trips(stack, nexus.pid, args.requests, args.concurrency, args.samples))
        nexus.terminate()
        nexus.wait(30)
        nexus = None
        asyncio.run(router_cpu(args.concurrency, args.router_calls, args.samples))
        asyncio.run(genesis_overhead(args.jobs, args.samples))
        asyncio.run(genesis_latency([case.language for case in GENESIS_CASES], args.jobs // 2, args.samples))
    finally:
        if nexus:
            nexus.terminate()
            nexus.wait(30)
        cluster.stop("immediate")
        shutil.rmtree(cluster.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
