"""Dual operation: one handler serves a pgmq publisher and a NATS-only publisher side by side (real
nats-server with JetStream, real PostgreSQL + pgmq), with the pgmq Consumer's contract on both paths."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from nats_support import Dual, llm_request, nats_settled, open_dual, path_of, until
from prometheus_client import REGISTRY
from support import settled

from singularity_stack import contract as c
from singularity_stack.sharedqueue import Permanent, RetryPolicy
from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.sharedqueue.nats_reader import NatsReader, archive_id, storable
from singularity_stack.sharedqueue.nats_replies import NatsReplies, ReplyRouter
from singularity_stack.sharedqueue.nats_streams import ensure_streams


@pytest.fixture
async def dual(open_stack, nats_for) -> Dual:
    return await open_dual(open_stack, nats_for)


def queue_count(dual: Dual, queue: str) -> int:
    return dual.stack.owner_query(f"SELECT count(*) FROM pgmq.q_{queue}")[0][0]


async def test_pgmq_and_nats_publishers_side_by_side_replies_on_their_own_path(dual):
    by_pgmq = llm_request("singularity_1")
    by_nats = llm_request("singularity_2")
    await (await dual.stack.queue("singularity_1")).publish(by_pgmq)
    await dual.nats_publish(by_nats)
    consumer, reader = dual.consumer(), dual.reader()
    handled_before = nats_settled("llm_requests", "handled")
    started = time.time()

    async def step() -> None:
        await consumer.run_once()
        await reader.run_once()

    await until(lambda: len(dual.effects()) == 2, step)
    assert sorted(dual.effects()) == sorted(
        [(by_pgmq.request_id, "singularity_1", "pgmq", 1), (by_nats.request_id, "singularity_2", "nats", 1)]
    )
    # The pgmq request's reply is in singularity_1's pgmq queue; the NATS request's on singularity_2's stream.
    singularity_1 = await dual.stack.queue("singularity_1")
    pgmq_replies = await singularity_1.read("llm_results_singularity_1", visibility_timeout=30, limit=10)
    assert [json.loads(r.body)["request_id"] for r in pgmq_replies] == [str(by_pgmq.request_id)]
    assert queue_count(dual, "llm_results_singularity_2") == 0
    [nats_reply] = await dual.nats_replies("singularity_2", 1)
    assert (nats_reply.request_id, nats_reply.recipient, nats_reply.result) == (
        by_nats.request_id,
        "singularity_2",
        "ok",
    )
    assert await dual.stream_messages("llm_results_singularity_1") == 0
    # Both are in pgmq's archive: the NATS one under a negative id, with its vouched sender.
    archived = dual.stack.owner_query("SELECT msg_id, message->>'request_id', headers FROM pgmq.a_llm_requests")
    by_path = {("nats" if msg_id < 0 else "pgmq"): (request_id, headers) for msg_id, request_id, headers in archived}
    assert set(by_path) == {"pgmq", "nats"}
    assert by_path["nats"][0] == str(by_nats.request_id)
    assert by_path["nats"][1]["path"] == "nats"
    assert by_path["nats"][1]["sender"] == "singularity_2"
    assert by_path["nats"][1]["sender_role"] == dual.layout.role("singularity_2")
    assert nats_settled("llm_requests", "handled") == handled_before + 1
    last = REGISTRY.get_sample_value("singularity_nats_last_message_timestamp_seconds", {"queue": "llm_requests"})
    assert last is not None and last >= started
    # The NATS reply, which reaches no pgmq queue, is in its pgmq archive too, written by Nexus.
    reply_archive = dual.stack.owner_query(
        "SELECT msg_id, message->>'request_id', headers->>'path' FROM pgmq.a_llm_results_singularity_2"
    )
    assert [(request_id, path) for _, request_id, path in reply_archive] == [(str(by_nats.request_id), "nats")]
    assert reply_archive[0][0] < 0
    # The request stream kept nothing: the acknowledged message is gone (work-queue retention).
    assert await dual.stream_messages("llm_requests") == 0


async def test_the_same_request_on_both_paths_is_handled_once(dual):
    """Singularity resends an open request under the same request_id; during the migration the copy may come by
    the other path. Whichever path is first handles it; the other finds the claim and only archives it."""
    nats_first, pgmq_first = llm_request("singularity_1"), llm_request("singularity_1")
    singularity_1 = await dual.stack.queue("singularity_1")
    consumer, reader = dual.consumer(), dual.reader()
    duplicates_before = nats_settled("llm_requests", "duplicate")
    pgmq_duplicates_before = settled("llm_requests", "duplicate")

    await dual.nats_publish(nats_first)
    await until(lambda: len(dual.effects()) == 1, reader.run_once)
    await singularity_1.publish(nats_first)
    await until(lambda: queue_count(dual, "llm_requests") == 0, consumer.run_once)

    await singularity_1.publish(pgmq_first)
    await until(lambda: len(dual.effects()) == 2, consumer.run_once)
    await dual.nats_publish(pgmq_first)
    await until(lambda: nats_settled("llm_requests", "duplicate") == duplicates_before + 1, reader.run_once)

    assert sorted(dual.effects()) == sorted(
        [(nats_first.request_id, "singularity_1", "nats", 1), (pgmq_first.request_id, "singularity_1", "pgmq", 1)]
    )
    assert settled("llm_requests", "duplicate") == pgmq_duplicates_before + 1
    # One reply each, on the path that handled it.
    [nats_reply] = await dual.nats_replies("singularity_1", 1)
    assert nats_reply.request_id == nats_first.request_id
    pgmq_replies = await singularity_1.read("llm_results_singularity_1", visibility_timeout=30, limit=10)
    assert [json.loads(r.body)["request_id"] for r in pgmq_replies] == [str(pgmq_first.request_id)]
    # Every message that came is in the archive, duplicates included: two per request, one from each path.
    archived = dual.stack.owner_query(
        "SELECT message->>'request_id', msg_id < 0 FROM pgmq.a_llm_requests ORDER BY 1, 2"
    )
    assert sorted(archived) == sorted(
        [(str(r.request_id), from_nats) for r in (nats_first, pgmq_first) for from_nats in (False, True)]
    )


def dead_letters(dual: Dual) -> dict[str, dict]:
    """llm_requests' dead letters by their reason."""
    rows = dual.stack.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")
    return {row[0]["reason"]: row[0] for row in rows}


async def test_nats_messages_that_cannot_be_handled_go_to_the_pgmq_dead_letter_queue(dual):
    reader = dual.reader()
    past = datetime.now(UTC) - timedelta(minutes=1)
    await dual.nats_publish_raw("singularity_1", "llm_requests", b'{"reply_to": "singularity_1"}')
    await dual.nats_publish(llm_request("singularity_2"), as_user="singularity_1")  # names another instance
    await dual.nats_publish(llm_request("singularity_1", deadline=past))
    nul = llm_request("singularity_1", messages=[{"role": "user", "content": "a\u0000b"}])
    await dual.nats_publish(nul)
    await until(lambda: queue_count(dual, "llm_requests_dlq") == 4, reader.run_once)
    rows = dual.stack.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq ORDER BY msg_id")
    by_order = [row[0] for row in rows]
    assert [letter["reason"] for letter in by_order] == ["invalid", "forged_sender", "expired", "invalid"]
    missing, forged, expired, unstorable = by_order
    assert "agent_id: Field required" in missing["error"]
    assert missing["message"] == {"reply_to": "singularity_1"}
    assert "reply_to singularity_2 but sent by singularity_1" in forged["error"]
    assert "deadline" in expired["error"]
    assert "U+0000" in unstorable["error"]
    assert unstorable["message"]["messages"][0]["content"] == "a\u2400b"
    for letter in by_order:
        assert letter["source_queue"] == "llm_requests"
        assert letter["headers"]["path"] == "nats"
        assert letter["headers"]["sender"] == "singularity_1"
        assert letter["source_msg_id"] < 0
    assert dual.effects() == []
    assert await dual.stream_messages("llm_requests") == 0  # all acknowledged


async def test_a_failed_nats_message_is_retried_and_a_permanent_one_dead_lettered(dual):
    failures = {"left": 1}

    async def flaky(delivery):
        if delivery.message.task_type == "doomed":
            raise Permanent("this can never work")
        await dual.handle(delivery)  # its effect is rolled back with the failure below
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("transient trouble")

    reader = dual.reader(flaky, policy=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05))
    retried = llm_request("singularity_1")
    await dual.nats_publish(retried)
    await dual.nats_publish(llm_request("singularity_1", task_type="doomed"))
    await until(lambda: len(dual.effects()) == 1 and "permanent" in dead_letters(dual), reader.run_once)
    assert dual.effects() == [(retried.request_id, "singularity_1", "nats", 2)]
    assert dead_letters(dual)["permanent"]["error"] == "this can never work"


def test_archive_ids_are_negative_distinct_and_stable():
    created = datetime(2026, 12, 1, tzinfo=UTC)
    ids = {archive_id(created, seq) for seq in range(1, 1000)}
    assert len(ids) == 999 and max(ids) < 0
    assert archive_id(created, 7) == archive_id(created, 7)
    assert archive_id(created + timedelta(seconds=1), 7) != archive_id(created, 7)


def test_storable_replaces_what_jsonb_refuses():
    assert storable({"k\u0000": ["a\u0000", "\ud800x"]}) == {"k\u2400": ["a\u2400", "\ufffdx"]}
    assert c.DeadLetter(
        source_queue="q", source_msg_id=-1, attempts=1, reason="invalid", error="e", message=storable("\ud800")
    ).model_dump_json()


async def test_streams_and_consumers_are_made_once(dual):
    """ensure_streams (run by CentralCloud's user) is idempotent: a stream per work queue, made the first time."""

    owner = await dual.nats.connect("centralcloud")
    assert await ensure_streams(owner.jetstream(), dual.layout) == []
    names = [name async for name in _stream_names(owner.jetstream())]
    assert sorted(names) == sorted(dual.layout.prefix + q for q in dual.layout.work_queues)


async def _stream_names(js):
    for name in await js.streams_info():
        yield name.config.name


async def test_genesis_reads_job_requests_from_nats_as_its_own_user(dual):
    """The same reader for Genesis: its own NATS user and durable consumer, its reply on the instance's job_results
    subject, archived in both pgmq archives with Genesis's grants."""

    genesis_queue = await dual.stack.queue("genesis")
    genesis_store = await dual.stack.store("genesis")
    genesis_nc = await dual.nats.connect("genesis")
    router = ReplyRouter(genesis_queue, NatsReplies(genesis_nc.jetstream(), dual.layout, genesis_queue))
    seen = []

    async def run_job(delivery):
        seen.append((delivery.message.request_id, delivery.sender, path_of(delivery)))
        reply = c.JobResult(request_id=delivery.message.request_id, recipient=delivery.sender, status="ok", output="1")
        await router.send(delivery, reply)

    reader = NatsReader(
        genesis_nc,
        dual.layout,
        "genesis",
        "job_requests",
        c.JobRequest,
        run_job,
        client=genesis_queue,
        store=genesis_store,
        fetch_timeout=0.2,
    )
    job = c.JobRequest(reply_to="singularity_2", agent_id="a", code="print(1)", language="python")
    await dual.nats_publish(job)
    await until(lambda: bool(seen), reader.run_once)
    assert seen == [(job.request_id, "singularity_2", "nats")]
    nc = await dual.nats.connect("singularity_2")
    sub = await nc.jetstream().pull_subscribe_bind(
        "singularity_2", subjects.stream(dual.layout, "job_results_singularity_2")
    )
    [msg] = await sub.fetch(1, timeout=10)
    assert c.JobResult.model_validate_json(msg.data).request_id == job.request_id
    for archive in ("job_requests", "job_results_singularity_2"):
        rows = dual.stack.owner_query(f"SELECT message->>'request_id', headers->>'path' FROM pgmq.a_{archive}")
        assert rows == [(str(job.request_id), "nats")], archive
