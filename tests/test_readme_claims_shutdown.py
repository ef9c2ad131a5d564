"""README: every service stops cleanly on SIGTERM: the batch in hand is finished, the rest handed back.

The services run as real processes (`singularity-stack run <service>`, tests/live_services.py); what is
"in hand" is seen in pgmq itself (a message read, `read_ct` 1, invisible), and what became of every
message after the exit is read from the queue, archive and dead-letter tables and the service's database.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
from live_services import SINGULARITY_TOKEN, LiveService, live_service
from support import Stack

from singularity_stack import contract as c
from singularity_stack.provision.provisioner import ProvisionResult
from singularity_stack.service.runtime import Service
from singularity_stack.service.settings import ServiceSettings
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore

# A model that takes `delay` seconds to answer: litellm's own mock, no network.
SLOW_ROUTING = """
models:
  - model_name: slow
    litellm_params: {{model: openai/slow, api_key: not-used, mock_response: "slow answer", mock_delay: {delay}}}
routes:
  default: {{simple: [slow], medium: [slow], complex: [slow]}}
router: {{num_retries: 0, timeout: 120, total_timeout: 120}}
"""


def llm_request(n: int) -> c.LlmRequest:
    return c.LlmRequest(
        reply_to="singularity_1", agent_id="a", task_type="chat", messages=[{"role": "user", "content": f"q{n}"}]
    )


def owner_rows(result: ProvisionResult, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(result.credentials["centralcloud"].shared_queue_url) as conn:
        return conn.execute(query, params).fetchall()


def db_rows(result: ProvisionResult, logical: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(result.credentials[logical].database_url) as conn:
        return conn.execute(query, params).fetchall()


def wait_until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.05)


def stop_with_sigterm(service: LiveService, timeout: float = 60.0) -> list[dict]:
    """SIGTERM the service; it must shut down cleanly: log '<service> stopped' (the end of Service.stop,
    after its consumers) and then exit. uvicorn re-raises the SIGTERM it caught once the shutdown is done,
    so the exit status is the signal's (-15 here, 143 in a shell), never a crash's. Returns its log."""
    service.process.send_signal(signal.SIGTERM)
    try:
        status = service.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{service.name} did not exit after SIGTERM:\n{service.log.read_text()[-3000:]}") from None
    records = assert_json_lines(service.log)
    role = "singularity" if service.name.startswith("singularity_") else service.name
    assert status == -signal.SIGTERM, (status, service.log.read_text()[-3000:])
    assert [r["message"] for r in records if r["message"] == f"{role} stopped"] == [f"{role} stopped"]
    assert [r for r in records if r["level"] in ("ERROR", "CRITICAL")] == []
    return records


def assert_json_lines(log: Path) -> list[dict]:
    """README: services log JSON lines. Every line the process wrote is one JSON object."""
    records = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        records.append(record)
    return records


def in_hand(result: ProvisionResult, queue: str) -> list[int]:
    return [
        msg_id
        for (msg_id,) in owner_rows(result, f"SELECT msg_id FROM pgmq.q_{queue} WHERE read_ct = 1 AND vt > now()")
    ]


async def test_sigterm_to_nexus_finishes_the_llm_call_in_hand_and_leaves_the_rest(provision_stack, tmp_path):
    result = provision_stack(1)
    routing = tmp_path / "routing.yaml"
    routing.write_text(SLOW_ROUTING.format(delay=2))
    sent = [llm_request(n) for n in range(3)]
    env = {"NEXUS_ROUTING_CONFIG": str(routing), "NEXUS_MAX_CONCURRENT_LLM": "1", "LOG_LEVEL": "INFO"}
    with live_service(result, "nexus", **env) as nexus:
        stack = Stack(result)
        try:
            await (await stack.queue("singularity_1")).publish_batch(sent)
        finally:
            await stack.close()
        wait_until(lambda: in_hand(result, "llm_requests"), what="a request in hand")
        [first] = in_hand(result, "llm_requests")
        stop_with_sigterm(nexus)
    # The call in hand was answered, recorded and archived ...
    replies = owner_rows(
        result, "SELECT message->>'request_id', message->>'result' FROM pgmq.q_llm_results_singularity_1"
    )
    assert replies == [(str(sent[0].request_id), "slow answer")]
    assert owner_rows(result, "SELECT msg_id FROM pgmq.a_llm_requests") == [(first,)]
    assert db_rows(result, "nexus", "SELECT request_id, model FROM llm_calls") == [(sent[0].request_id, "slow")]
    # ... the others never taken: in the queue, visible, unread; nothing dead-lettered.
    rest = owner_rows(result, "SELECT message->>'request_id', read_ct, vt <= now() FROM pgmq.q_llm_requests")
    assert sorted(rest) == sorted((str(r.request_id), 0, True) for r in sent[1:])
    assert owner_rows(result, "SELECT count(*) FROM pgmq.q_llm_requests_dlq") == [(0,)]


async def publish(result: ProvisionResult, logical: str, messages: list[c.Message]) -> list[int]:
    stack = Stack(result)
    try:
        return await (await stack.queue(logical)).publish_batch(messages)
    finally:
        await stack.close()


async def test_sigterm_to_nexus_past_the_grace_period_hands_the_call_in_hand_back(provision_stack, tmp_path):
    result = provision_stack(1)
    routing = tmp_path / "routing.yaml"
    routing.write_text(SLOW_ROUTING.format(delay=600))  # far beyond the grace period
    env = {
        "NEXUS_ROUTING_CONFIG": str(routing),
        "NEXUS_MAX_CONCURRENT_LLM": "1",
        "SHUTDOWN_GRACE_SECONDS": "1",
        "LOG_LEVEL": "INFO",
    }
    with live_service(result, "nexus", **env) as nexus:
        [msg_id] = await publish(result, "singularity_1", [llm_request(0)])
        wait_until(lambda: in_hand(result, "llm_requests"), what="the request in hand")
        records = stop_with_sigterm(nexus)
    assert any(r["message"] == "queue llm_requests released 1 in-flight messages" for r in records)
    # Back in the queue at once, its read given back: no attempt used up, nothing answered or recorded.
    assert owner_rows(result, "SELECT msg_id, read_ct, vt <= now() FROM pgmq.q_llm_requests") == [(msg_id, 0, True)]
    assert owner_rows(result, "SELECT count(*) FROM pgmq.q_llm_results_singularity_1") == [(0,)]
    assert owner_rows(result, "SELECT count(*) FROM pgmq.q_llm_requests_dlq") == [(0,)]
    assert db_rows(result, "nexus", "SELECT count(*) FROM llm_calls") == [(0,)]
    assert db_rows(result, "nexus", "SELECT count(*) FROM processed_messages") == [(0,)]


async def test_sigterm_to_genesis_finishes_the_job_in_hand(provision_stack):
    result = provision_stack(1)
    job = c.JobRequest(
        reply_to="singularity_1",
        agent_id="a",
        language="python",
        code="import time\ntime.sleep(2)\nprint('finished after SIGTERM')\n",
    )
    with live_service(result, "genesis", GENESIS_MAX_CONCURRENT_JOBS="1", LOG_LEVEL="INFO") as genesis:
        [msg_id] = await publish(result, "singularity_1", [job])
        wait_until(lambda: in_hand(result, "job_requests"), what="the job in hand")
        stop_with_sigterm(genesis)
    [(reply,)] = owner_rows(result, "SELECT message FROM pgmq.q_job_results_singularity_1")
    assert (reply["request_id"], reply["status"], reply["output"]) == (
        str(job.request_id),
        "ok",
        "finished after SIGTERM\n",
    )
    assert owner_rows(result, "SELECT msg_id FROM pgmq.a_job_requests") == [(msg_id,)]
    assert owner_rows(result, "SELECT count(*) FROM pgmq.q_job_requests") == [(0,)]


def task_steps(result: ProvisionResult, task_id: str) -> list[tuple]:
    return db_rows(
        result, "singularity_1", "SELECT name, state, request_id FROM steps WHERE task_id = %s ORDER BY seq", (task_id,)
    )


def sent_llm_requests(result: ProvisionResult) -> list[str]:
    """Every LLM request ever sent: still queued, or archived by Nexus."""
    return [
        rid
        for (rid,) in owner_rows(
            result,
            "SELECT message->>'request_id' FROM (SELECT msg_id, message FROM pgmq.q_llm_requests "
            "UNION ALL SELECT msg_id, message FROM pgmq.a_llm_requests) m ORDER BY msg_id",
        )
    ]


async def test_sigterm_to_singularity_mid_task_then_a_restart_resends_under_the_same_id(provision_stack):
    """The step's request was sent once before the stop; the restarted instance re-sends it under the same
    request_id, and the real Nexus answers it once (the second copy is a duplicate)."""
    result = provision_stack(1)
    headers = {"Authorization": f"Bearer {SINGULARITY_TOKEN}"}
    with live_service(result, "singularity_1", LOG_LEVEL="INFO") as singularity:
        created = httpx.post(
            f"{singularity.url}/tasks", json={"description": "Write a program that prints a greeting"}, headers=headers
        )
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        wait_until(lambda: len(sent_llm_requests(result)) == 1, what="the specification request sent")
        stop_with_sigterm(singularity)
    [(name, state, request_id)] = task_steps(result, task_id)
    assert (name, state) == ("specification", "waiting")
    assert sent_llm_requests(result) == [str(request_id)]
    assert db_rows(result, "singularity_1", "SELECT state FROM tasks WHERE id = %s", (task_id,)) == [("running",)]

    with live_service(result, "singularity_1") as singularity:
        wait_until(lambda: len(sent_llm_requests(result)) == 2, what="the re-send")
        assert sent_llm_requests(result) == [str(request_id)] * 2  # the same request, under the same id
        with live_service(result, "nexus"):
            wait_until(lambda: ("specification", "done") in [s[:2] for s in task_steps(result, task_id)], what="reply")
            wait_until(lambda: owner_rows(result, "SELECT count(*) FROM pgmq.q_llm_requests") == [(0,)])
    assert db_rows(result, "nexus", "SELECT count(*) FROM llm_calls WHERE request_id = %s", (request_id,)) == [(1,)]
    answers = owner_rows(
        result,
        "SELECT count(*) FROM (SELECT message FROM pgmq.q_llm_results_singularity_1 UNION ALL "
        "SELECT message FROM pgmq.a_llm_results_singularity_1) m WHERE message->>'request_id' = %s",
        (str(request_id),),
    )
    assert answers == [(1,)]  # answered once: Nexus found the re-send's (sender, request_id) already claimed


async def test_sigterm_to_centralcloud_stops_cleanly(provision_stack):
    result = provision_stack(1)
    with live_service(result, "centralcloud", LOG_LEVEL="INFO") as centralcloud:
        stop_with_sigterm(centralcloud)


# -- the grace period, in one process ------------------------------------------------------------------


class OneConsumer(Service):
    """A service whose only work is one consumer of llm_requests, as Nexus's (Nexus's role and database)."""

    name = "one-consumer"

    def __init__(self, settings: ServiceSettings, handler) -> None:
        super().__init__(settings)
        self.handler = handler

    def consumers(self) -> list[Consumer]:
        store = IdempotencyStore(self.db)
        return [
            Consumer(self.queue, "llm_requests", c.LlmRequest, self.handler, store=store, batch_size=2, concurrency=2)
        ]


async def test_a_stop_finishes_what_ends_within_the_grace_period_and_hands_the_rest_back(sq):
    with psycopg.connect(sq.db_url("nexus"), autocommit=True) as conn:
        conn.execute("CREATE TABLE effects (request_id uuid PRIMARY KEY)")
    sent = [llm_request(n) for n in range(3)]
    ids = await (await sq.queue("singularity_1")).publish_batch(sent)
    started: dict[uuid.UUID, asyncio.Event] = {r.request_id: asyncio.Event() for r in sent}
    finish_first = asyncio.Event()

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        started[delivery.message.request_id].set()
        await delivery.db.execute("INSERT INTO effects VALUES (%s)", (delivery.message.request_id,))
        if delivery.message.request_id == sent[0].request_id:
            await finish_first.wait()  # ends during the grace period
        else:
            await asyncio.Event().wait()  # never ends

    settings = ServiceSettings(
        database_url=sq.db_url("nexus"), shared_queue_url=sq.url("nexus"), shutdown_grace_seconds=1.0
    )
    service = OneConsumer(settings, handle)
    await service.start()
    await asyncio.wait_for(asyncio.gather(*(started[r.request_id].wait() for r in sent[:2])), 30)  # the batch in hand
    stopping = asyncio.create_task(service.stop())
    await asyncio.sleep(0)  # the stop has begun: the grace period runs
    finish_first.set()
    await asyncio.wait_for(stopping, 30)

    assert not started[sent[2].request_id].is_set()  # beyond the batch: never taken
    with psycopg.connect(sq.db_url("nexus")) as conn:
        assert conn.execute("SELECT request_id FROM effects").fetchall() == [(sent[0].request_id,)]
    assert sq.owner_query("SELECT msg_id FROM pgmq.a_llm_requests") == [(ids[0],)]  # finished and archived
    rest = sq.owner_query("SELECT msg_id, read_ct, vt <= now() FROM pgmq.q_llm_requests ORDER BY msg_id")
    assert rest == [(ids[1], 0, True), (ids[2], 0, True)]  # handed back, its read given back; never read
