"""The migration from NATS through the real services, in-process (real PostgreSQL + pgmq, a real nats-server
with JetStream, each service as its own PostgreSQL role and NATS user): MESSAGING_MODE dual and cutover.

CentralCloud creates the streams at start (the server starts without them); Nexus serves a NATS-only
publisher and a pgmq publisher side by side and answers each on its own path, a human's answer included;
a request sent on both paths is handled once; an instance publishes on both paths and reads its replies
from NATS; in cutover a NATS request is refused on its NATS reply subject and dead-lettered, pgmq is served.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import psycopg
import pytest
from nats.js.errors import NotFoundError
from nats_fixture import NatsStack
from prometheus_client import REGISTRY
from support import Stack

from singularity_stack import contract as c
from singularity_stack.centralcloud.service import CentralCloudService, CentralCloudSettings
from singularity_stack.genesis.service import GenesisService, GenesisSettings
from singularity_stack.nexus.service import NexusService, NexusSettings
from singularity_stack.service.runtime import Service
from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.sharedqueue.nats_cutover import REFUSAL
from singularity_stack.singularity.service import SingularityService, SingularitySettings

PROVIDER_KEYS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")
TOKEN = "token-for-the-nats-service-tests"


class Dual:
    """A provisioned stack of two instances, its nats-server, and services started in a mode."""

    def __init__(self, stack: Stack, nats: NatsStack) -> None:
        self.stack = stack
        self.nats = nats
        self.layout = stack.result.layout
        self.services: list[Service] = []

    def common(self, logical: str, mode: str) -> dict[str, Any]:
        creds = self.stack.result.credentials[logical]
        return {
            "database_url": creds.database_url,
            "shared_queue_url": creds.shared_queue_url,
            "messaging_mode": mode,
            "nats_url": self.nats.server.url,
            "nats_password": self.nats.passwords[logical],
            "singularity_instances": self.layout.instances,
            "stack_prefix": self.layout.prefix,
        }

    async def start(self, service: Service) -> Any:
        await service.start()
        self.services.append(service)
        return service

    async def nexus(self, mode: str) -> NexusService:
        settings = NexusSettings(**self.common("nexus", mode), ui_token=TOKEN)
        service: NexusService = await self.start(NexusService(settings))
        await until_async(lambda: _connected(service), what="Nexus's NATS connection")
        return service

    async def singularity(self, mode: str, instance: str, publish_to: str) -> SingularityService:
        settings = SingularitySettings(
            **self.common(instance, mode), api_token=TOKEN, instance_id=instance, publish_to=publish_to
        )
        service: SingularityService = await self.start(SingularityService(settings))
        await until_async(lambda: _connected(service), what="Singularity's NATS connection")
        return service

    async def stop(self) -> None:
        for service in reversed(self.services):
            await service.stop()

    # -- what the tests look at --------------------------------------------------------------------

    async def streams_exist(self) -> bool:
        owner = await self.nats.witness()
        try:
            for queue in self.layout.work_queues:
                await owner.jetstream().stream_info(subjects.stream(self.layout, queue))
            return True
        except NotFoundError:
            return False
        finally:
            await owner.close()

    async def nats_request(self, request: c.Request) -> None:
        """As a NATS-only agent: on its own request subject, as its own NATS user."""
        nc = await self.nats.connect(request.reply_to)
        await nc.jetstream().publish(
            subjects.request_subject(self.layout, request.queue, request.reply_to), request.model_dump_json().encode()
        )

    async def nats_replies(self, queue: str, expect: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Up to `expect` replies from a reply queue's stream, read as the instance's durable consumer."""
        work = subjects.work_queue(self.layout, queue)
        assert work is not None
        nc = await self.nats.connect(work.instance)
        sub = await nc.jetstream().pull_subscribe_bind(work.instance, subjects.stream(self.layout, queue))
        got: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(got) < expect and loop.time() < deadline:
            try:
                msgs = await sub.fetch(expect - len(got), timeout=1.0)
            except TimeoutError:
                continue
            for msg in msgs:
                await msg.ack_sync()
                got.append(json.loads(msg.data))
        return got

    async def stream_count(self, queue: str) -> int:
        nc = await self.nats.witness()
        try:
            info = await nc.jetstream().stream_info(subjects.stream(self.layout, queue))
            return int(info.state.messages)
        finally:
            await nc.close()

    def pgmq(self, queue: str) -> list[dict[str, Any]]:
        return [row[0] for row in self.stack.owner_query(f"SELECT message FROM pgmq.q_{queue} ORDER BY msg_id")]

    def archived(self, queue: str) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
        return self.stack.owner_query(f"SELECT msg_id, message, headers FROM pgmq.a_{queue} ORDER BY msg_id")

    def nexus_rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.stack.db_url("nexus")) as conn:
            return conn.execute(query, params).fetchall()


def _connected(service: Service) -> Awaitable[bool]:
    async def check() -> bool:
        return service.messaging.details().get("nats") == "connected"

    return check()


async def until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    await until_async(lambda: _value(condition()), timeout, what)


async def _value(value: bool) -> bool:
    return value


async def until_async(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"{what} never held"
        await asyncio.sleep(0.1)


@pytest.fixture
async def dual(open_stack, nats_for, monkeypatch) -> AsyncIterator[Dual]:
    for key in PROVIDER_KEYS:
        monkeypatch.delenv(key, raising=False)  # Nexus answers with the offline model: no network
    stack = open_stack(2)
    nats = await nats_for(stack.result.layout, streams=False)  # CentralCloud creates the streams
    handle = Dual(stack, nats)
    yield handle
    await handle.stop()


async def start_central(dual: Dual, mode: str) -> CentralCloudService:
    analytics = dual.stack.result.credentials["centralcloud"].shared_queue_analytics_url
    settings = CentralCloudSettings(**dual.common("centralcloud", mode), analytics_url=analytics, api_token=TOKEN)
    assert not await dual.streams_exist()
    central: CentralCloudService = await dual.start(CentralCloudService(settings))
    await until_async(dual.streams_exist, what="CentralCloud's NATS streams")
    return central


async def _empty(dual: Dual, queue: str) -> bool:
    return await dual.stream_count(queue) == 0


def held_for_nats() -> float:
    return REGISTRY.get_sample_value("singularity_nexus_hitl_pending_nats") or 0.0


def llm(reply_to: str, text: str = "write fizzbuzz") -> c.LlmRequest:
    return c.LlmRequest(
        reply_to=reply_to, agent_id="agent-7", task_type="coder", messages=[{"role": "user", "content": text}]
    )


def llm_calls(dual: Dual, request: c.Request) -> int:
    return dual.nexus_rows("SELECT count(*) FROM llm_calls WHERE request_id = %s", (request.request_id,))[0][0]


async def test_dual_serves_a_nats_and_a_pgmq_publisher_each_answered_on_its_own_path(dual):
    central = await start_central(dual, "dual")
    nexus = await dual.nexus("dual")
    by_nats, by_pgmq = llm("singularity_1"), llm("singularity_2")
    await dual.nats_request(by_nats)
    await (await dual.stack.queue("singularity_2")).publish(by_pgmq)
    await until(lambda: llm_calls(dual, by_nats) == 1 and llm_calls(dual, by_pgmq) == 1, what="both handled")

    nats_replies = await dual.nats_replies("llm_results_singularity_1", 1)
    assert [r["request_id"] for r in nats_replies] == [str(by_nats.request_id)]
    assert nats_replies[0]["result"] and nats_replies[0]["recipient"] == "singularity_1"
    assert dual.pgmq("llm_results_singularity_1") == []  # nothing of the NATS request's answer on pgmq
    assert [m["request_id"] for m in dual.pgmq("llm_results_singularity_2")] == [str(by_pgmq.request_id)]
    assert await dual.stream_count("llm_results_singularity_2") == 0  # nor the pgmq one's on NATS

    # Both requests are in pgmq's archive, each saying its path; the NATS reply is archived by Nexus too.
    await until(lambda: len(dual.archived("llm_requests")) == 2, what="both requests archived")
    paths = {m["request_id"]: h.get("path", "pgmq") for _, m, h in dual.archived("llm_requests")}
    assert paths == {str(by_nats.request_id): "nats", str(by_pgmq.request_id): "pgmq"}
    replies = [(m["request_id"], h.get("path")) for _, m, h in dual.archived("llm_results_singularity_1")]
    assert replies == [(str(by_nats.request_id), "nats")]

    # Readiness for phase 3, in CentralCloud's analytics: messages per queue and path, the last NATS one.
    report = await central.learn("test")
    by_queue = {(row["queue"], row["path"]): row["messages"] for row in report["paths"]["by_queue"]}
    assert by_queue[("llm_requests", "nats")] == 1 and by_queue[("llm_requests", "pgmq")] == 1
    assert by_queue[("llm_results_singularity_1", "nats")] == 1
    assert report["paths"]["nats_messages"] == 2 and report["paths"]["last_nats_message_at"] is not None
    assert nexus.messaging.details() == {"messaging_mode": "dual", "nats": "connected"}


async def test_dual_a_request_sent_on_both_paths_is_handled_and_answered_once(dual):
    await start_central(dual, "dual")
    await dual.nexus("dual")
    twice = llm("singularity_1")
    await dual.nats_request(twice)
    await (await dual.stack.queue("singularity_1")).publish(twice)
    # Both copies are settled (one handled, one a duplicate) once both are archived.
    await until(lambda: len(dual.archived("llm_requests")) == 2, what="both copies archived")
    assert llm_calls(dual, twice) == 1
    on_pgmq = dual.pgmq("llm_results_singularity_1")
    on_nats = await dual.nats_replies("llm_results_singularity_1", 2, timeout=3.0)
    assert len(on_pgmq) + len(on_nats) == 1, (on_pgmq, on_nats)


async def test_dual_a_human_answers_a_nats_request_on_nats(dual):
    await start_central(dual, "dual")
    nexus = await dual.nexus("dual")
    by_nats = c.ApprovalRequest(
        reply_to="singularity_2", agent_id="agent-7", file_path="a.py", description="add a", diff="+a"
    )
    by_pgmq = by_nats.model_copy(update={"request_id": c.ApprovalRequest.model_fields["request_id"].default_factory()})
    await dual.nats_request(by_nats)
    await (await dual.stack.queue("singularity_2")).publish(by_pgmq)
    await until(lambda: len(dual.nexus_rows("SELECT 1 FROM hitl_requests")) == 2, what="both held")
    held = dict(dual.nexus_rows("SELECT request_id::text, reply_path FROM hitl_requests"))
    assert held == {str(by_nats.request_id): "nats", str(by_pgmq.request_id): "pgmq"}

    await until(lambda: held_for_nats() == 1, what="the gauge of answers owed on NATS")  # Nexus's own job

    await nexus.hitl.decide(by_nats.request_id, True, "", "alice")
    await nexus.hitl.decide(by_pgmq.request_id, False, "no tests", "bob")
    await nexus.count_held_for_nats()
    assert held_for_nats() == 0
    on_nats = await dual.nats_replies("approval_responses_singularity_2", 1)
    assert [(r["request_id"], r["approved"], r["decided_by"]) for r in on_nats] == [
        (str(by_nats.request_id), True, "alice")
    ]
    assert [m["request_id"] for m in dual.pgmq("approval_responses_singularity_2")] == [str(by_pgmq.request_id)]


async def test_dual_an_instance_publishes_on_both_paths_and_reads_its_replies_from_nats(dual):
    await start_central(dual, "dual")
    singularity = await dual.singularity("dual", "singularity_1", "both")
    readers = sorted(reader.queue for reader in singularity.messaging.readers)
    assert readers == sorted(f"{kind}_singularity_1" for kind in c.REPLIES)
    request = llm("singularity_1")
    await singularity.context.queue.publish(request)
    assert [m["request_id"] for m in dual.pgmq("llm_requests")] == [str(request.request_id)]
    assert await dual.stream_count("llm_requests") == 1

    # A reply on NATS (as Nexus sends one) is read and archived once, under the id Nexus's copy has.
    await dual.nexus("dual")
    await until(lambda: len(dual.archived("llm_requests")) == 2, what="both copies settled by Nexus")
    await until(lambda: dual.pgmq("llm_results_singularity_1") == [], what="the reply read")
    await until(lambda: len(dual.archived("llm_results_singularity_1")) == 1, what="the reply archived")
    # read and acknowledged (after its archive row), or never sent
    await until_async(lambda: _empty(dual, "llm_results_singularity_1"), what="the reply acknowledged")


async def test_cutover_refuses_nats_requests_on_their_reply_subject_and_serves_pgmq(dual):
    await start_central(dual, "cutover")
    await dual.nexus("cutover")
    by_nats, by_pgmq = llm("singularity_1"), llm("singularity_2")
    await dual.nats_request(by_nats)
    await (await dual.stack.queue("singularity_2")).publish(by_pgmq)

    refused = await dual.nats_replies("llm_results_singularity_1", 1)
    assert [(r["request_id"], r["error"]) for r in refused] == [(str(by_nats.request_id), REFUSAL)]
    await until(lambda: llm_calls(dual, by_pgmq) == 1, what="the pgmq request served")
    assert llm_calls(dual, by_nats) == 0  # refused, never handled
    dead = "SELECT message FROM pgmq.q_llm_requests_dlq"
    await until(lambda: dual.stack.owner_query(dead) != [], what="the refused request dead-lettered")
    letters = [row[0] for row in dual.stack.owner_query(dead)]
    assert [(d["reason"], d["error"], d["message"]["request_id"]) for d in letters] == [
        ("permanent", REFUSAL, str(by_nats.request_id))
    ]
    await until_async(lambda: _empty(dual, "llm_requests"), what="the refused request acknowledged")


async def test_cutover_answers_a_request_held_in_dual_on_nats_and_instances_still_read_nats_replies(dual):
    """A human may decide after the cutover on a request a NATS publisher sent during dual operation: the
    answer goes back on NATS, and the instance (in cutover too) still reads its NATS reply stream."""
    await start_central(dual, "dual")
    nexus = await dual.nexus("dual")
    held = c.QuestionRequest(reply_to="singularity_1", agent_id="agent-7", question="which port?")
    await dual.nats_request(held)
    await until(lambda: len(dual.nexus_rows("SELECT 1 FROM hitl_requests")) == 1, what="the question held")
    await nexus.stop()
    dual.services.remove(nexus)

    nexus = await dual.nexus("cutover")
    singularity = await dual.singularity("cutover", "singularity_1", "pgmq")
    assert sorted(r.queue for r in singularity.messaging.readers) == sorted(f"{k}_singularity_1" for k in c.REPLIES)
    await nexus.hitl.answer(held.request_id, "8080", "alice")
    # Read by the instance from its NATS reply stream and archived once, with the NATS path.
    await until(lambda: len(dual.archived("question_responses_singularity_1")) == 1, what="the answer read")
    [(_, message, headers)] = dual.archived("question_responses_singularity_1")
    assert (message["request_id"], message["response"], headers["path"]) == (str(held.request_id), "8080", "nats")
    assert dual.pgmq("question_responses_singularity_1") == []


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"MESSAGING_MODE": "dual"}, "MESSAGING_MODE=dual needs NATS_URL, NATS_PASSWORD, SINGULARITY_INSTANCES"),
        (
            {"MESSAGING_MODE": "cutover", "NATS_URL": "nats://n:4222", "NATS_PASSWORD": "p" * 20},
            "MESSAGING_MODE=cutover needs SINGULARITY_INSTANCES",
        ),
        ({"MESSAGING_MODE": "nats"}, "MESSAGING_MODE"),
        ({"SINGULARITY_PUBLISH_TO": "both"}, "SINGULARITY_PUBLISH_TO=both needs MESSAGING_MODE=dual"),
    ],
)
def test_a_service_refuses_a_messaging_setting_that_cannot_work_in_one_line(monkeypatch, values, says):
    from singularity_stack.service.run import build_service
    from singularity_stack.service.settings import SettingsError

    base = {
        "DATABASE_URL": "postgresql:///singularity_1",
        "SHARED_QUEUE_DB_URL": "postgresql:///shared_queue",
        "SINGULARITY_API_TOKEN": TOKEN,
    }
    for key, value in {**base, **values}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=says) as refused:
        build_service("singularity")
    assert "\n" not in str(refused.value)


async def test_dual_genesis_runs_a_nats_job_and_answers_it_on_nats(dual):
    await start_central(dual, "dual")
    genesis = await dual.start(GenesisService(GenesisSettings(**dual.common("genesis", "dual"))))
    job = c.JobRequest(reply_to="singularity_2", agent_id="a-1", code="print(6 * 7)\n", language="python", run=True)
    await dual.nats_request(job)
    [result] = await dual.nats_replies("job_results_singularity_2", 1, timeout=60)
    assert (result["request_id"], result["status"], result["output"]) == (str(job.request_id), "ok", "42\n")
    assert dual.pgmq("job_results_singularity_2") == []
    await until(lambda: dual.archived("job_requests") != [], what="the job archived")  # after its reply
    paths = [(m["request_id"], h["path"]) for _, m, h in dual.archived("job_requests")]
    assert paths == [(str(job.request_id), "nats")]
    # /readyz says which mode the service is in and whether its NATS connection is up.
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=genesis.app()), base_url="http://localhost")
    details = (await client.get("/readyz")).json()["details"]
    assert (details["messaging_mode"], details["nats"]) == ("dual", "connected")


async def test_dual_without_a_reachable_nats_server_still_serves_pgmq_and_stops_promptly(dual):
    common = dual.common("genesis", "dual") | {"nats_url": "nats://127.0.0.1:9", "shutdown_grace_seconds": 2}
    genesis = GenesisService(GenesisSettings(**common))
    await genesis.start()
    try:
        job = c.JobRequest(reply_to="singularity_1", agent_id="a-1", code="print(1)\n", language="python", run=True)
        await (await dual.stack.queue("singularity_1")).publish(job)
        await until(lambda: dual.pgmq("job_results_singularity_1") != [], timeout=60, what="the pgmq job answered")
        assert genesis.messaging.details() == {"messaging_mode": "dual", "nats": "not connected"}
    finally:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await genesis.stop()
        assert loop.time() - started < 10  # the grace, not a NATS timeout
