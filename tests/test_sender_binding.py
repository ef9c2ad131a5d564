"""Each request is bound to the role that sent it, by PostgreSQL: driven as an attacker would, with pgmq's
own Python client under a Singularity instance's credentials, against the real Nexus and Genesis.

The provisioner's trigger writes the login role into every request's headers; consumers answer only
the instance PostgreSQL vouches for, deduplicate per sender, and dead-letter everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from pgmq import PGMQueue
from psycopg.types.json import Jsonb
from support import Stack

from singularity_stack import contract as c
from singularity_stack.genesis.service import GenesisService, GenesisSettings
from singularity_stack.nexus.hitl import Hitl, RequestIdTaken
from singularity_stack.nexus.service import NexusService, NexusSettings
from singularity_stack.provision.provisioner import Provisioner, with_database
from singularity_stack.provision.queues import SENDER_TRIGGER
from singularity_stack.sharedqueue import Permanent
from singularity_stack.topology import REPLY_SENDER

REQUEST_QUEUES = ["llm_requests", "approval_requests", "question_requests", "job_requests"]


def llm_request(**overrides: Any) -> c.LlmRequest:
    fields: dict[str, Any] = {
        "reply_to": "singularity_1",
        "agent_id": "agent-7",
        "task_type": "coder",
        "messages": [{"role": "user", "content": "write fizzbuzz"}],
    }
    return c.LlmRequest(**(fields | overrides))


def approval_request(**overrides: Any) -> c.ApprovalRequest:
    fields: dict[str, Any] = {"reply_to": "singularity_1", "agent_id": "agent-7", "file_path": "a.py", "diff": "+x"}
    return c.ApprovalRequest(**(fields | overrides))


def question_request(**overrides: Any) -> c.QuestionRequest:
    fields: dict[str, Any] = {"reply_to": "singularity_1", "agent_id": "agent-7", "question": "Which port?"}
    return c.QuestionRequest(**(fields | overrides))


def job_request(**overrides: Any) -> c.JobRequest:
    fields: dict[str, Any] = {
        "reply_to": "singularity_1",
        "agent_id": "agent-7",
        "code": "print('hi')\n",
        "language": "python",
        "run": False,
    }
    return c.JobRequest(**(fields | overrides))


def body(message: c.Message) -> dict[str, Any]:
    return json.loads(message.model_dump_json())


@contextlib.contextmanager
def pgmq_as(stack: Stack, logical: str):
    """pgmq's own client, logged in as `logical`'s role: what an attacker holding those credentials runs."""
    client = PGMQueue(conn_string=stack.url(logical), init_extension=False, pool_size=1)
    try:
        yield client
    finally:
        client.close()


async def eventually(probe: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := probe()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return value


def queued(stack: Stack, queue: str) -> list[dict[str, Any]]:
    return [r[0] for r in stack.owner_query(f"SELECT message FROM pgmq.q_{queue} ORDER BY msg_id")]


def archived(stack: Stack, queue: str) -> list[dict[str, Any]]:
    return [r[0] for r in stack.owner_query(f"SELECT message FROM pgmq.a_{queue} ORDER BY msg_id")]


def service_rows(stack: Stack, logical: str, query: str) -> list[tuple]:
    with psycopg.connect(stack.db_url(logical)) as conn:
        return conn.execute(query).fetchall()


@contextlib.asynccontextmanager
async def nexus_running(stack: Stack) -> AsyncIterator[NexusService]:
    creds = stack.result.credentials["nexus"]
    service = NexusService(
        NexusSettings(database_url=creds.database_url, shared_queue_url=creds.shared_queue_url, ui_token="t" * 16)
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def genesis_running(stack: Stack) -> AsyncIterator[GenesisService]:
    creds = stack.result.credentials["genesis"]
    service = GenesisService(GenesisSettings(database_url=creds.database_url, shared_queue_url=creds.shared_queue_url))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def ignore(callback: object) -> None:
    """An after-commit hook that drops what it is given: these tests look at the database only."""


def reply_queues(instance: str) -> list[str]:
    return [f"{kind}_{instance}" for kind in REPLY_SENDER]


# -- the trigger -------------------------------------------------------------------------------------


async def test_forged_sender_headers_are_overwritten_by_postgresql(open_stack):
    stack = open_stack(2)
    role_1, role_2 = stack.result.layout.role("singularity_1"), stack.result.layout.role("singularity_2")
    forged = {"sender": "singularity_2", "sender_role": role_2, "trace": "t-1"}
    with pgmq_as(stack, "singularity_1") as attacker:
        attacker.send("llm_requests", body(llm_request(reply_to="singularity_2")), headers=forged)
        attacker.send_batch("job_requests", [body(job_request(reply_to="singularity_2"))], headers=[forged])
        attacker.send("approval_requests", body(approval_request(reply_to="singularity_2")), headers=["not", "a dict"])
    # straight into the table, past pgmq's functions
    with psycopg.connect(stack.url("singularity_1")) as conn:
        conn.execute(
            "INSERT INTO pgmq.q_question_requests (vt, message, headers) VALUES (now(), %s, %s)",
            (Jsonb(body(question_request(reply_to="singularity_2"))), Jsonb(forged)),
        )
    # and a later UPDATE of the headers is refused: senders may only insert
    with psycopg.connect(stack.url("singularity_1")) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("UPDATE pgmq.q_llm_requests SET headers = %s", (Jsonb(forged),))
    vouched = {"sender": "singularity_1", "sender_role": role_1}
    for queue in ("llm_requests", "job_requests", "question_requests"):
        assert stack.owner_query(f"SELECT headers FROM pgmq.q_{queue}") == [(vouched | {"trace": "t-1"},)], queue
    assert stack.owner_query("SELECT headers FROM pgmq.q_approval_requests") == [
        (vouched | {"sent": ["not", "a dict"]},)
    ]

    async with nexus_running(stack):
        for queue in ("llm_requests", "approval_requests", "question_requests"):
            await eventually(lambda q=queue: queued(stack, q + "_dlq"))
    for queue in ("llm_requests", "approval_requests", "question_requests"):
        [letter] = queued(stack, queue + "_dlq")
        assert letter["reason"] == "forged_sender", letter
        assert "reply_to singularity_2 but sent by singularity_1" in letter["error"]
    for queue in reply_queues("singularity_2"):
        assert queued(stack, queue) == [], queue


async def test_the_provisioner_installs_the_trigger_once_and_a_second_run_changes_nothing(admin_dsn, open_stack):
    stack = open_stack(1)
    layout = stack.result.layout
    triggers = """SELECT c.relname, t.oid, t.xmin::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                  WHERE t.tgname = %s ORDER BY c.relname"""
    function = "SELECT oid, xmin::text FROM pg_proc WHERE oid = to_regprocedure('pgmq.stamp_sender()')"
    before = stack.owner_query(triggers, (SENDER_TRIGGER,))
    assert [r[0] for r in before] == sorted(f"q_{q}" for q in REQUEST_QUEUES)  # requests only, never replies
    proc = stack.owner_query(function)
    again = Provisioner(admin_dsn, layout, known_passwords=stack.result.passwords, report=lambda _: None).run()
    assert again.changes == []
    assert stack.owner_query(triggers, (SENDER_TRIGGER,)) == before
    assert stack.owner_query(function) == proc


# -- the consumers -----------------------------------------------------------------------------------


async def test_a_request_naming_another_instance_is_dead_lettered_and_never_answered(open_stack):
    stack = open_stack(2)
    forged = [llm_request(reply_to="singularity_2"), approval_request(reply_to="singularity_2")]
    forged.append(question_request(reply_to="singularity_2"))
    honest = llm_request()
    with pgmq_as(stack, "singularity_1") as attacker:
        for message in forged:
            attacker.send(message.queue, body(message))
        attacker.send("llm_requests", body(honest))  # behind the forged one: its answer means that one was settled
    async with nexus_running(stack):
        [answer] = await eventually(lambda: queued(stack, "llm_results_singularity_1"))
        for message in forged:
            await eventually(lambda m=message: queued(stack, m.queue + "_dlq"))
    assert answer["request_id"] == str(honest.request_id)
    for message in forged:
        [letter] = queued(stack, message.queue + "_dlq")
        assert letter["reason"] == "forged_sender"
        assert letter["error"] == (
            f"reply_to singularity_2 but sent by singularity_1 (role {stack.result.layout.role('singularity_1')})"
        )
        assert letter["message"] == body(message)  # kept whole
        assert letter["headers"]["sender"] == "singularity_1"
        assert str(message.request_id) not in [m["request_id"] for m in archived(stack, message.queue)]
    for queue in reply_queues("singularity_2"):
        assert queued(stack, queue) == [], queue
    assert service_rows(stack, "nexus", "SELECT sender, request_id FROM processed_messages") == [
        ("singularity_1", honest.request_id)
    ]
    assert service_rows(stack, "nexus", "SELECT count(*) FROM hitl_requests") == [(0,)]


async def test_two_instances_sending_the_same_request_id_are_both_answered(open_stack):
    stack = open_stack(2)
    shared = uuid.uuid4()
    by_pgmq = uuid.uuid4()
    # the project's own client ...
    for instance in ("singularity_1", "singularity_2"):
        client = await stack.queue(instance)
        await client.publish(llm_request(request_id=shared, reply_to=instance, agent_id=f"agent-of-{instance}"))
    # ... and pgmq's, the other instance first this time
    for instance in ("singularity_2", "singularity_1"):
        with pgmq_as(stack, instance) as client:
            client.send("llm_requests", body(llm_request(request_id=by_pgmq, reply_to=instance)))
    async with nexus_running(stack):
        for instance in ("singularity_1", "singularity_2"):
            await eventually(lambda i=instance: len(queued(stack, f"llm_results_{i}")) == 2)
    for instance in ("singularity_1", "singularity_2"):
        replies = queued(stack, f"llm_results_{instance}")
        assert sorted(r["request_id"] for r in replies) == sorted([str(shared), str(by_pgmq)])
        assert {r["recipient"] for r in replies} == {instance}
    assert queued(stack, "llm_requests_dlq") == []
    calls = service_rows(stack, "nexus", "SELECT instance, request_id FROM llm_calls ORDER BY 1, 2")
    assert calls == sorted((i, r) for i in ("singularity_1", "singularity_2") for r in (shared, by_pgmq))
    processed = service_rows(stack, "nexus", "SELECT sender, request_id FROM processed_messages ORDER BY 1, 2")
    assert processed == calls


async def test_genesis_answers_only_the_vouched_sender_and_each_instance_under_a_shared_id(open_stack):
    stack = open_stack(2)
    shared = uuid.uuid4()
    forged = job_request(reply_to="singularity_2")
    with pgmq_as(stack, "singularity_1") as attacker:
        attacker.send("job_requests", body(forged), headers={"sender": "singularity_2"})
        attacker.send("job_requests", body(job_request(request_id=shared)))
    with pgmq_as(stack, "singularity_2") as other:
        other.send("job_requests", body(job_request(request_id=shared, reply_to="singularity_2")))
    async with genesis_running(stack):
        for instance in ("singularity_1", "singularity_2"):
            await eventually(lambda i=instance: queued(stack, f"job_results_{i}"), timeout=60)
        await eventually(lambda: queued(stack, "job_requests_dlq"))
    for instance in ("singularity_1", "singularity_2"):
        [reply] = queued(stack, f"job_results_{instance}")
        assert (reply["request_id"], reply["recipient"], reply["status"]) == (str(shared), instance, "ok")
    [letter] = queued(stack, "job_requests_dlq")
    assert (letter["reason"], letter["message"]["request_id"]) == ("forged_sender", str(forged.request_id))
    executions = service_rows(stack, "genesis", "SELECT instance, request_id FROM executions ORDER BY 1")
    assert executions == [("singularity_1", shared), ("singularity_2", shared)]


async def test_requests_queued_before_the_trigger_existed_are_dead_lettered_on_upgrade(admin_dsn, open_stack):
    """A stack provisioned before senders were recorded: provisioning again adds the trigger, and what is
    already queued carries no vouched sender, whatever its headers say."""
    stack = open_stack(2)
    layout = stack.result.layout
    with psycopg.connect(with_database(admin_dsn, layout.shared_queue_database), autocommit=True) as admin:
        admin.execute(f"DROP TRIGGER IF EXISTS {SENDER_TRIGGER} ON pgmq.q_llm_requests")
    old = [llm_request(), llm_request(reply_to="singularity_2")]
    with pgmq_as(stack, "singularity_1") as sender:
        sender.send("llm_requests", body(old[0]))
        sender.send("llm_requests", body(old[1]), headers={"sender": "singularity_2"})
    Provisioner(admin_dsn, layout, known_passwords=stack.result.passwords, report=lambda _: None).run()
    assert [r[0] for r in stack.owner_query("SELECT headers FROM pgmq.q_llm_requests ORDER BY msg_id")] == [
        None,
        {"unvouched": {"sender": "singularity_2"}},
    ]
    new = llm_request()
    await (await stack.queue("singularity_1")).publish(new)
    async with nexus_running(stack):
        [answer] = await eventually(lambda: queued(stack, "llm_results_singularity_1"))
        letters = await eventually(
            lambda: len(queued(stack, "llm_requests_dlq")) == 2 and queued(stack, "llm_requests_dlq")
        )
    assert answer["request_id"] == str(new.request_id)
    assert [(d["reason"], d["message"]["request_id"]) for d in letters] == [
        ("forged_sender", str(m.request_id)) for m in old
    ]
    assert all(d["error"].startswith("no sender vouched by PostgreSQL") for d in letters), letters
    assert queued(stack, "llm_results_singularity_2") == []


async def test_a_queue_without_the_trigger_vouches_for_no_one(admin_dsn, open_stack):
    """Should the trigger be missing (dropped, or a consumer started before provisioning), a `sender`
    header is the sender's own word: nothing is answered on it."""
    stack = open_stack(2)
    with psycopg.connect(with_database(admin_dsn, stack.result.layout.shared_queue_database), autocommit=True) as admin:
        admin.execute(f"DROP TRIGGER IF EXISTS {SENDER_TRIGGER} ON pgmq.q_llm_requests")
    forged = llm_request(reply_to="singularity_2")
    with pgmq_as(stack, "singularity_1") as attacker:
        attacker.send("llm_requests", body(forged), headers={"sender": "singularity_2"})
    async with nexus_running(stack):
        [letter] = await eventually(lambda: queued(stack, "llm_requests_dlq"))
    assert letter["reason"] == "forged_sender"
    assert "does not record senders" in letter["error"]
    assert queued(stack, "llm_results_singularity_2") == []


async def test_hitl_refuses_a_request_id_held_for_another_instance(open_stack):
    """Reviewers address requests by id: a second instance's request under a held id can never be held,
    so it is refused as Permanent (dead-lettered at once by the consumer), not taken for a duplicate."""
    stack = open_stack(2)
    hitl = Hitl(await stack.db_pool("nexus"), await stack.queue("nexus"))
    request = approval_request()
    async with hitl.store.pool.connection() as conn, conn.transaction():
        await hitl.receive(conn, request, "singularity_1", ignore)
    with pytest.raises(RequestIdTaken, match="already held for singularity_1, not singularity_2") as refused:
        async with hitl.store.pool.connection() as conn, conn.transaction():
            await hitl.receive(conn, request.model_copy(update={"reply_to": "singularity_2"}), "singularity_2", ignore)
    assert isinstance(refused.value, Permanent)
    async with hitl.store.pool.connection() as conn, conn.transaction():
        await hitl.receive(conn, request, "singularity_1", ignore)  # its own redelivery: quietly nothing new
    assert service_rows(stack, "nexus", "SELECT instance, request_id FROM hitl_requests") == [
        ("singularity_1", request.request_id)
    ]
