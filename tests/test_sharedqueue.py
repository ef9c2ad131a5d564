"""The shared-queue client on real PostgreSQL + pgmq, each service connecting as its own role."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from support import send_raw

from singularity_stack import contract as c
from singularity_stack.sharedqueue import (
    Consumer,
    Delivery,
    IdempotencyStore,
    NotifyListener,
    Permanent,
    RetryAfter,
    RetryPolicy,
    Unavailable,
)

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture
async def store(sq) -> IdempotencyStore:
    """Every consumer here is Nexus's: its claims, and the test handlers' effects, live in Nexus's database."""
    service_rows(sq, "CREATE TABLE IF NOT EXISTS effects (request_id uuid PRIMARY KEY, note text)")
    return await sq.store("nexus")


def service_rows(sq, query: str) -> list[tuple]:
    with psycopg.connect(sq.db_url("nexus"), autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def llm_request(**overrides) -> c.LlmRequest:
    data = {
        "reply_to": "singularity_1",
        "agent_id": "agent-7",
        "task_type": "coder",
        "messages": [{"role": "user", "content": "write fizzbuzz"}],
    }
    return c.LlmRequest(**{**data, **overrides})


async def settle(consumer: Consumer, sq, timeout: float = 20.0) -> None:
    """Run the consumer until its queue is empty: every message archived or dead-lettered."""
    deadline = asyncio.get_running_loop().time() + timeout
    while sq.owner_query(f"SELECT count(*) FROM pgmq.q_{consumer.queue}") != [(0,)]:
        assert asyncio.get_running_loop().time() < deadline, "queue did not drain"
        if await consumer.run_once() == 0:
            await asyncio.sleep(0.02)


async def test_publish_consume_archive(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    request = llm_request()
    msg_id = await singularity.publish(request)
    seen: list[Delivery[c.LlmRequest]] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        seen.append(delivery)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store)
    assert await consumer.run_once() == 1
    assert [(d.message, d.msg_id, d.attempt) for d in seen] == [(request, msg_id, 1)]
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests") == [(0,)]
    archived = sq.owner_query("SELECT msg_id, message->>'request_id' FROM pgmq.a_llm_requests")
    assert archived == [(msg_id, str(request.request_id))]


async def test_publish_batch_routes_each_message_and_keeps_order(sq):
    singularity = await sq.queue("singularity_1")
    messages = [llm_request(), c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language="python")]
    messages += [llm_request() for _ in range(3)]
    ids = await singularity.publish_batch(messages)
    llm_ids = [r[0] for r in sq.owner_query("SELECT msg_id FROM pgmq.q_llm_requests ORDER BY msg_id")]
    assert llm_ids == [ids[0], *ids[2:]]
    assert sq.owner_query("SELECT msg_id FROM pgmq.q_job_requests") == [(ids[1],)]
    # each stored as its own model_dump_json, though a queue's messages are serialized in one call
    stored = {
        (queue, msg_id): message
        for queue in ("llm_requests", "job_requests")
        for msg_id, message in sq.owner_query(f"SELECT msg_id, message FROM pgmq.q_{queue}")
    }
    written = [stored[m.queue, i] for m, i in zip(messages, ids, strict=True)]
    assert written == [json.loads(m.model_dump_json()) for m in messages]


async def test_replies_go_to_the_recipients_own_queue(sq):
    nexus = await sq.queue("nexus")
    request = llm_request()
    await nexus.publish(c.LlmResult(**c.reply_fields(request), result="done", model="offline/echo"))
    rows = sq.owner_query("SELECT message->>'request_id' FROM pgmq.q_llm_results_singularity_1")
    assert rows == [(str(request.request_id),)]


async def test_invalid_data_names_the_field_before_anything_is_sent(sq):
    with pytest.raises(c.InvalidMessage, match="messages: List should have at least 1 item"):
        c.build("llm_requests", {"reply_to": "singularity_1", "agent_id": "a", "task_type": "coder", "messages": []})


async def test_invalid_consumed_message_is_dead_lettered_and_the_consumer_goes_on(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    send_raw(sq, "singularity_1", "llm_requests", {"agent_id": "a", "task_type": "coder"})  # no messages, no reply_to
    send_raw(sq, "singularity_1", "llm_requests", "not even an object")
    good = await singularity.publish(llm_request())
    handled: list[int] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        handled.append(delivery.msg_id)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store)
    await settle(consumer, sq)
    assert handled == [good]
    letters = [c.DeadLetter.model_validate(r[0]) for r in sq.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")]
    assert [letter.reason for letter in letters] == ["invalid", "invalid"]
    assert "reply_to: Field required" in letters[0].error
    assert "messages: Field required" in letters[0].error
    assert letters[0].message == {"agent_id": "a", "task_type": "coder"}  # the original, untouched
    assert letters[1].message == "not even an object"


async def test_failures_are_retried_with_backoff_then_succeed(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    await singularity.publish(llm_request())
    attempts: list[int] = []

    async def flaky(delivery: Delivery[c.LlmRequest]) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 3:
            raise ConnectionResetError("provider hiccup")

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, flaky, store=store, policy=RetryPolicy(3, 0.05, 0.2))
    await consumer.run_once()
    # back-off: the message is invisible right after the failure
    assert await consumer.run_once() == 0
    await settle(consumer, sq)
    assert attempts == [1, 2, 3]
    assert sq.owner_query("SELECT read_ct FROM pgmq.a_llm_requests") == [(3,)]


async def test_poison_message_ends_in_the_dead_letter_queue_with_its_reason(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    request = llm_request()
    await singularity.publish(request)

    async def poisoned(delivery: Delivery[c.LlmRequest]) -> None:
        raise ValueError("model refused the prompt")

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, poisoned, store=store, policy=FAST_RETRY)
    await settle(consumer, sq)
    [(body,)] = sq.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")
    letter = c.DeadLetter.model_validate(body)
    assert (letter.reason, letter.attempts, letter.source_queue) == ("failed", 3, "llm_requests")
    assert letter.error == "ValueError: model refused the prompt"
    assert c.LlmRequest.model_validate(letter.message) == request
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests") == [(0,)]


async def test_expired_request_is_dead_lettered_not_handled(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    await singularity.publish(llm_request(deadline=datetime.now(UTC) - timedelta(seconds=1)))

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        raise AssertionError("an expired request must not be handled")

    await settle(Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store), sq)
    [(reason,)] = sq.owner_query("SELECT message->>'reason' FROM pgmq.q_llm_requests_dlq")
    assert reason == "expired"


async def test_redelivered_request_id_is_processed_once(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    request = llm_request()
    await singularity.publish(request)
    await singularity.publish(request)  # e.g. a publish retried after a lost acknowledgement
    handled: list[uuid.UUID] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        handled.append(delivery.message.request_id)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store)
    await settle(consumer, sq)
    assert handled == [request.request_id]
    claims = service_rows(sq, "SELECT queue, sender, request_id FROM processed_messages")
    assert claims == [("llm_requests", "singularity_1", request.request_id)]
    assert sq.owner_query("SELECT count(*) FROM pgmq.a_llm_requests") == [(2,)]


async def test_a_failed_handler_leaves_no_claim_so_the_retry_runs(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    request = llm_request()
    await singularity.publish(request)
    calls = 0

    async def fails_once(delivery: Delivery[c.LlmRequest]) -> None:
        nonlocal calls
        calls += 1
        await delivery.db.execute("INSERT INTO effects VALUES (%s)", (delivery.message.request_id,))
        if calls == 1:
            raise RuntimeError("crash after the write")

    await settle(Consumer(nexus, "llm_requests", c.LlmRequest, fails_once, store=store, policy=FAST_RETRY), sq)
    assert calls == 2
    async with store.pool.connection() as conn:
        rows = await (await conn.execute("SELECT request_id FROM effects")).fetchall()
    assert rows == [(request.request_id,)]


class CountingReads:
    """Wraps a client's `read`: how many reads finished, and an event set when one came back empty."""

    def __init__(self, client) -> None:
        self.finished = 0
        self.came_back_empty = asyncio.Event()
        real = client.read

        async def read(*args, **kwargs):
            rows = await real(*args, **kwargs)
            self.finished += 1
            if not rows:
                self.came_back_empty.set()
            return rows

        client.read = read


async def test_notify_wakes_the_consumer_without_polling(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    reads = CountingReads(nexus)
    listener = NotifyListener(sq.url("nexus"), ["llm_requests"])
    listening = asyncio.create_task(listener.run())
    got = asyncio.Event()

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        got.set()

    consumer = Consumer(
        nexus,
        "llm_requests",
        c.LlmRequest,
        handle,
        store=store,
        poll_interval=3600,
        wakeup=listener.event("llm_requests"),
    )
    stop = asyncio.Event()
    await asyncio.wait_for(listener.connected.wait(), 10)
    consuming = asyncio.create_task(consumer.run(stop))
    # The consumer has read the empty queue: its next read comes after an hour, or a notification.
    await asyncio.wait_for(reads.came_back_empty.wait(), 10)
    assert reads.finished == 1
    await singularity.publish(llm_request())
    await asyncio.wait_for(got.wait(), 10)
    assert reads.finished >= 2  # the read that found it was woken, not polled (the poll is an hour away)
    stop.set()
    await asyncio.wait_for(consuming, 10)
    listening.cancel()


async def test_a_message_that_sends_no_notification_is_found_by_the_fallback_poll(sq, store):
    """A delayed message notifies at its insert, while still invisible: only the fallback poll finds it."""
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    reads = CountingReads(nexus)
    listener = NotifyListener(sq.url("nexus"), ["llm_requests"])
    listening = asyncio.create_task(listener.run())
    got = asyncio.Event()

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        got.set()

    consumer = Consumer(
        nexus,
        "llm_requests",
        c.LlmRequest,
        handle,
        store=store,
        poll_interval=0.3,
        wakeup=listener.event("llm_requests"),
    )
    stop = asyncio.Event()
    await asyncio.wait_for(listener.connected.wait(), 10)
    consuming = asyncio.create_task(consumer.run(stop))
    await asyncio.wait_for(reads.came_back_empty.wait(), 10)
    await singularity.publish(llm_request(), delay_seconds=1)
    published_after = reads.finished
    await asyncio.wait_for(got.wait(), 10)
    assert reads.finished - published_after >= 2  # the notified read found nothing; a later poll found it
    stop.set()
    await asyncio.wait_for(consuming, 10)
    listening.cancel()


async def test_graceful_stop_finishes_the_batch_in_hand_and_takes_no_more(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    ids = await singularity.publish_batch([llm_request(agent_id=f"a{n}") for n in range(4)])
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def slow(delivery: Delivery[c.LlmRequest]) -> None:
        started.set()
        await release.wait()
        await effect(delivery, delivery.message.agent_id)
        handled.append(delivery.msg_id)

    stop = asyncio.Event()
    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, slow, store=store, batch_size=2)
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.wait_for(started.wait(), 10)  # the first batch (two messages) is in hand
    stop.set()
    release.set()
    await asyncio.wait_for(task, 10)
    assert handled == ids[:2]  # the batch in hand, finished
    assert sq.owner_query("SELECT msg_id FROM pgmq.a_llm_requests ORDER BY msg_id") == [(i,) for i in ids[:2]]
    assert service_rows(sq, "SELECT note FROM effects ORDER BY note") == [("a0",), ("a1",)]
    # The rest was never taken: visible, unread.
    rest = sq.owner_query("SELECT msg_id, read_ct, vt <= now() FROM pgmq.q_llm_requests ORDER BY msg_id")
    assert rest == [(i, 0, True) for i in ids[2:]]


async def test_cancelled_consumer_makes_in_flight_messages_visible_at_once(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    msg_id = await singularity.publish(llm_request())
    started = asyncio.Event()

    async def stuck(delivery: Delivery[c.LlmRequest]) -> None:
        started.set()
        await asyncio.sleep(3600)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, stuck, store=store, visibility_timeout=3600)
    task = asyncio.create_task(consumer.run(asyncio.Event()))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    again = await nexus.read("llm_requests", visibility_timeout=30, limit=10)  # not after an hour: now
    assert [(m.msg_id, m.read_ct) for m in again] == [(msg_id, 1)]  # and the cancelled read was given back


async def test_metrics_show_depth_and_age(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    owner = await sq.queue("centralcloud")
    ids = await singularity.publish_batch([llm_request() for _ in range(3)])
    # The oldest message has waited two minutes, the others ten seconds.
    sq.owner_query(
        "UPDATE pgmq.q_llm_requests SET enqueued_at = now() - CASE WHEN msg_id = %s THEN interval '120 s' "
        "ELSE interval '10 s' END RETURNING 1",
        (ids[0],),
    )
    await nexus.read("llm_requests", visibility_timeout=60, limit=1)  # one in flight: queued, not visible
    metrics = {m.queue: m for m in await owner.metrics_all()}
    llm = metrics["llm_requests"]
    assert (llm.length, llm.visible, llm.total_messages) == (3, 2, 3)
    assert 120 <= llm.oldest_age_seconds < 180
    assert (metrics["job_requests"].length, metrics["job_requests"].oldest_age_seconds) == (0, None)
    assert "llm_results_singularity_1_dlq" in metrics  # every queue reported, dead-letter queues too


async def test_concurrency_bounds_handlers_in_flight_within_a_batch(sq, store):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    await singularity.publish_batch([llm_request() for _ in range(6)])
    in_flight = peak = 0

    async def slow(delivery: Delivery[c.LlmRequest]) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1

    parallel = Consumer(nexus, "llm_requests", c.LlmRequest, slow, store=store, batch_size=6, concurrency=3)
    assert await parallel.run_once() == 6
    assert peak == 3
    await singularity.publish_batch([llm_request() for _ in range(4)])
    peak = 0
    in_order = Consumer(nexus, "llm_requests", c.LlmRequest, slow, store=store, batch_size=4)
    assert await in_order.run_once() == 4
    assert peak == 1


async def test_messages_inside_the_notify_throttle_window_are_not_left_waiting(sq, store):
    """pgmq skips notifications for inserts within the throttle window after one; the consumer's
    extra read after the window must pick them up (its fallback poll here is an hour)."""
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    listener = NotifyListener(sq.url("nexus"), ["llm_requests"])
    listening = asyncio.create_task(listener.run())
    seen: list[int] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        seen.append(delivery.msg_id)
        await asyncio.sleep(0.02)  # slower than the window: the extra read must still happen

    consumer = Consumer(
        nexus,
        "llm_requests",
        c.LlmRequest,
        handle,
        store=store,
        poll_interval=3600,
        wakeup=listener.event("llm_requests"),
    )
    stop = asyncio.Event()
    await asyncio.wait_for(listener.connected.wait(), 10)
    consuming = asyncio.create_task(consumer.run(stop))
    for _burst in range(5):
        await asyncio.sleep(0.1)
        ids = [await singularity.publish(llm_request()) for _ in range(3)]  # back to back: one notification

        async def all_seen(ids=ids) -> None:
            while not set(ids) <= set(seen):
                await asyncio.sleep(0.005)

        await asyncio.wait_for(all_seen(), 5)
    stop.set()
    await asyncio.wait_for(consuming, 10)
    listening.cancel()


# -- the handler contract -------------------------------------------------------------------------


async def effect(delivery: Delivery[c.LlmRequest], note: str = "") -> None:
    await delivery.db.execute("INSERT INTO effects VALUES (%s, %s)", (delivery.message.request_id, note))


async def test_permanent_dead_letters_at_once_with_the_handlers_reason(sq, store):
    await (await sq.queue("singularity_1")).publish(llm_request())
    nexus = await sq.queue("nexus")

    async def refuse(delivery: Delivery[c.LlmRequest]) -> None:
        await effect(delivery)
        raise Permanent("task_type coder is not served here")

    await settle(Consumer(nexus, "llm_requests", c.LlmRequest, refuse, store=store), sq)
    [(letter,)] = sq.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")
    assert (letter["reason"], letter["attempts"], letter["error"]) == (
        "permanent",
        1,
        "task_type coder is not served here",
    )
    assert service_rows(sq, "SELECT count(*) FROM effects") == [(0,)]  # its effects rolled back
    assert service_rows(sq, "SELECT count(*) FROM processed_messages") == [(0,)]


async def test_retry_after_hides_the_message_for_that_long_then_it_runs(sq, store):
    await (await sq.queue("singularity_1")).publish(llm_request())
    nexus = await sq.queue("nexus")
    attempts: list[int] = []

    async def later(delivery: Delivery[c.LlmRequest]) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            raise RetryAfter(30, "provider rate limit")

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, later, store=store)
    await consumer.run_once()
    [(hidden_for,)] = sq.owner_query("SELECT extract(epoch FROM vt - now()) FROM pgmq.q_llm_requests")
    assert 25 < hidden_for <= 30  # its own delay, not the policy's one-second back-off
    sq.owner_query("UPDATE pgmq.q_llm_requests SET vt = now() RETURNING 1")  # let time pass
    await settle(consumer, sq)
    assert attempts == [1, 2]
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests_dlq") == [(0,)]


@pytest.mark.parametrize("begin_early", [False, True])
async def test_a_batch_is_one_transaction_and_a_failing_message_rolls_back_alone(sq, store, begin_early):
    """Also with the batch's transaction begun beside its read (`begin_early`, as `run` does after a wake-up)."""
    singularity = await sq.queue("singularity_1")
    sent = [llm_request(agent_id=f"a{n}") for n in range(5)]
    await singularity.publish_batch(sent)
    nexus = await sq.queue("nexus")

    runs: list[str] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        row = await (await delivery.db.execute("SELECT pg_current_xact_id()::text")).fetchone()  # the top level's
        await effect(delivery, f"{delivery.message.agent_id} {row[0]}")
        runs.append(delivery.message.agent_id)
        if delivery.message.agent_id == "a2":
            raise RuntimeError("the third one fails after its write")

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store, batch_size=5, policy=FAST_RETRY)
    assert await consumer.run_once(begin_early=begin_early) == 5
    notes = [note.split() for (note,) in service_rows(sq, "SELECT note FROM effects ORDER BY note")]
    assert [agent for agent, _ in notes] == ["a0", "a1", "a3", "a4"]
    assert len({transaction for _, transaction in notes}) == 1  # committed by one transaction
    # The pass without savepoints rolled back at a2; the rest ran again, each message in a savepoint.
    assert runs == ["a0", "a1", "a2", "a0", "a1", "a3", "a4"]
    claims = service_rows(sq, "SELECT request_id FROM processed_messages")
    assert {r for (r,) in claims} == {m.request_id for m in sent} - {sent[2].request_id}
    assert sq.owner_query("SELECT message->>'agent_id' FROM pgmq.q_llm_requests") == [("a2",)]  # retried later


async def test_after_commit_runs_once_committed_and_never_after_a_rollback(sq, store):
    singularity = await sq.queue("singularity_1")
    await singularity.publish_batch([llm_request(agent_id="ok"), llm_request(agent_id="fails")])
    nexus = await sq.queue("nexus")
    seen_by_callback: list[tuple[str, list[tuple]]] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        await effect(delivery, delivery.message.agent_id)
        name = delivery.message.agent_id
        # From another connection: the effect is visible only once the transaction committed.
        delivery.after_commit(lambda: seen_by_callback.append((name, service_rows(sq, "SELECT note FROM effects"))))
        if name == "fails":
            raise RuntimeError("after registering its callback")

    for concurrency in (1, 2):
        seen_by_callback.clear()
        consumer = Consumer(
            nexus, "llm_requests", c.LlmRequest, handle, store=store, batch_size=2, concurrency=concurrency
        )
        assert await consumer.run_once() == 2
        assert seen_by_callback == [("ok", [("ok",)])], concurrency
        service_rows(sq, "DELETE FROM effects RETURNING 1")
        service_rows(sq, "DELETE FROM processed_messages RETURNING 1")
        sq.owner_query("UPDATE pgmq.q_llm_requests SET vt = now() RETURNING 1")
        await singularity.publish(llm_request(agent_id="ok"))


@pytest.mark.parametrize("begin_early", [False, True])
async def test_infrastructure_trouble_hands_the_batch_back_and_counts_against_nothing(sq, store, begin_early):
    msg_id = await (await sq.queue("singularity_1")).publish(llm_request())
    nexus = await sq.queue("nexus")

    async def shared_queue_down(delivery: Delivery[c.LlmRequest]) -> None:
        await effect(delivery)
        raise Unavailable("shared queue: connection refused")

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, shared_queue_down, store=store, policy=FAST_RETRY)
    for _ in range(FAST_RETRY.max_attempts + 2):  # more rounds than the message has attempts
        with pytest.raises(Unavailable):
            await consumer.run_once(begin_early=begin_early)
    # back at once, with every read given back
    assert sq.owner_query("SELECT msg_id, vt <= now(), read_ct FROM pgmq.q_llm_requests") == [(msg_id, True, 0)]
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests_dlq") == [(0,)]
    assert service_rows(sq, "SELECT count(*) FROM processed_messages") == [(0,)]


def nothing_held(sq, store: IdempotencyStore) -> None:
    """Every connection of the store's pool is back in it, and none of its sessions is inside a transaction."""
    stats = store.pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"], stats
    open_transactions = service_rows(
        sq,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()",
    )
    assert open_transactions == [(0,)]


async def test_a_transaction_begun_beside_a_read_is_ended_when_the_read_finds_nothing_or_fails(sq, store):
    nexus = await sq.queue("nexus", retry_for=0)
    handled: list[int] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        handled.append(delivery.msg_id)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store)
    assert await consumer.run_once(begin_early=True) == 0
    nothing_held(sq, store)
    real_read = nexus.read

    async def read_fails(*args, **kwargs):
        await asyncio.sleep(0.05)  # the transaction beside it has begun by now
        raise Unavailable("shared queue: connection refused")

    nexus.read = read_fails
    with pytest.raises(Unavailable):
        await consumer.run_once(begin_early=True)
    nothing_held(sq, store)

    async def read_hangs(*args, **kwargs):
        await asyncio.Event().wait()

    nexus.read = read_hangs
    reading = asyncio.create_task(consumer.run_once(begin_early=True))
    await asyncio.sleep(0.05)
    reading.cancel()  # a shutdown in the middle of the read
    with pytest.raises(asyncio.CancelledError):
        await reading
    nothing_held(sq, store)
    nexus.read = real_read
    msg_id = await (await sq.queue("singularity_1")).publish(llm_request())
    assert await consumer.run_once(begin_early=True) == 1
    assert handled == [msg_id]
    nothing_held(sq, store)


async def test_a_notification_inside_the_throttle_window_is_read_at_once(sq, store):
    """The consumer waits out the window after a wake-up for the inserts pgmq did not notify; a notification
    in the meantime (an insert after pgmq's own, shorter, window) is read at once, not after the wait."""
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    listener = NotifyListener(sq.url("nexus"), ["llm_requests"])
    listening = asyncio.create_task(listener.run())
    handled: dict[int, float] = {}

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        handled[delivery.msg_id] = asyncio.get_running_loop().time()

    consumer = Consumer(
        nexus,
        "llm_requests",
        c.LlmRequest,
        handle,
        store=store,
        poll_interval=3600,
        wakeup=listener.event("llm_requests"),
        notify_throttle=30.0,  # the consumer's window: far longer than pgmq's 2 ms
    )
    stop = asyncio.Event()
    await asyncio.wait_for(listener.connected.wait(), 10)
    consuming = asyncio.create_task(consumer.run(stop))
    first = await singularity.publish(llm_request())
    while first not in handled:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # pgmq's window has closed: this insert notifies
    sent = asyncio.get_running_loop().time()
    second = await singularity.publish(llm_request())
    while second not in handled:
        assert asyncio.get_running_loop().time() - sent < 10, "the notification was not acted on"
        await asyncio.sleep(0.005)
    stop.set()
    await asyncio.wait_for(consuming, 10)
    listening.cancel()


# A consumer in its own process that dies in its after-commit callback: after the commit, before the callback.
DIES_BEFORE_ITS_CALLBACK = """
import asyncio, os, sys
from psycopg_pool import AsyncConnectionPool
from singularity_stack import contract as c
from singularity_stack.sharedqueue import Consumer, IdempotencyStore, SharedQueue

async def main(queue_url, db_url):
    pool = AsyncConnectionPool(db_url, open=False)
    await pool.open()
    async def handle(delivery):
        await delivery.db.execute("INSERT INTO effects VALUES (%s, 'stored')", (delivery.message.request_id,))
        delivery.after_commit(lambda: os._exit(9))  # killed right after the commit
    async with SharedQueue(queue_url) as client:
        await Consumer(client, "llm_requests", c.LlmRequest, handle, store=IdempotencyStore(pool)).run_once()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_process_killed_between_commit_and_callback_loses_nothing(sq, store):
    """The callback never ran; what it stood for is in the database, and the redelivery is a duplicate."""
    request = llm_request()
    await (await sq.queue("singularity_1")).publish(request)
    dead = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DIES_BEFORE_ITS_CALLBACK, sq.url("nexus"), sq.db_url("nexus")
    )
    assert await asyncio.wait_for(dead.wait(), 60) == 9
    assert service_rows(sq, "SELECT request_id, note FROM effects") == [(request.request_id, "stored")]
    sq.owner_query("UPDATE pgmq.q_llm_requests SET vt = now() RETURNING 1")  # its visibility timeout, passed
    handled: list[int] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        handled.append(delivery.msg_id)

    await settle(Consumer(await sq.queue("nexus"), "llm_requests", c.LlmRequest, handle, store=store), sq)
    assert handled == []  # a duplicate: archived, not handled again
    assert sq.owner_query("SELECT read_ct FROM pgmq.a_llm_requests") == [(2,)]


async def test_a_handler_that_swallows_a_database_error_has_failed(sq, store):
    """Its transaction is aborted: committing would silently drop the claims and effects of the whole batch."""
    singularity = await sq.queue("singularity_1")
    await singularity.publish_batch([llm_request(agent_id=a) for a in ("first", "swallows", "last")])
    nexus = await sq.queue("nexus")

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        await effect(delivery, delivery.message.agent_id)
        if delivery.message.agent_id == "swallows":
            with contextlib.suppress(psycopg.errors.UniqueViolation):
                await effect(delivery, "again")  # the same primary key

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store, batch_size=3, policy=FAST_RETRY)
    assert await consumer.run_once() == 3
    assert service_rows(sq, "SELECT note FROM effects ORDER BY note") == [("first",), ("last",)]
    assert sq.owner_query("SELECT message->>'agent_id' FROM pgmq.a_llm_requests ORDER BY 1") == [("first",), ("last",)]
    assert sq.owner_query("SELECT message->>'agent_id' FROM pgmq.q_llm_requests") == [("swallows",)]  # retried


async def test_a_statement_failing_on_a_live_connection_is_the_messages_failure(sq, store):
    """A timeout, a deadlock or a constraint is not the database being away: retried, never 'Unavailable'."""
    await (await sq.queue("singularity_1")).publish(llm_request())
    nexus = await sq.queue("nexus")

    async def slow_query(delivery: Delivery[c.LlmRequest]) -> None:
        await delivery.db.execute("SET LOCAL statement_timeout = 10")
        await delivery.db.execute("SELECT pg_sleep(1)")  # QueryCanceled, an OperationalError

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, slow_query, store=store, policy=FAST_RETRY)
    await settle(consumer, sq)
    [(letter,)] = sq.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")
    assert (letter["reason"], letter["attempts"]) == ("failed", 3)
    assert "QueryCanceled" in letter["error"]


async def test_a_fault_in_the_consumer_itself_does_not_stop_it(sq, store, monkeypatch):
    await (await sq.queue("singularity_1")).publish(llm_request())
    nexus = await sq.queue("nexus")
    handled = asyncio.Event()

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        handled.set()

    real_claim, failures = store.claim, [RuntimeError("a bug of ours, once")]

    async def claim_failing_once(*args):
        if failures:
            raise failures.pop()
        return await real_claim(*args)

    monkeypatch.setattr(store, "claim", claim_failing_once)
    stop = asyncio.Event()
    consuming = asyncio.create_task(
        Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store, poll_interval=0.05).run(stop)
    )
    await asyncio.wait_for(handled.wait(), 10)
    stop.set()
    await asyncio.wait_for(consuming, 10)
    assert sq.owner_query("SELECT read_ct FROM pgmq.a_llm_requests") == [(1,)]  # the failed round cost nothing


async def test_a_retried_dead_letter_move_writes_one_letter(sq):
    """A move whose commit succeeded but whose answer was lost is retried: it must not send a second letter."""
    await (await sq.queue("singularity_1")).publish(llm_request())
    nexus = await sq.queue("nexus")
    [raw] = await nexus.read("llm_requests", visibility_timeout=30, limit=1)
    assert await nexus.dead_letter("llm_requests", raw, "invalid", "first") is not None
    assert await nexus.dead_letter("llm_requests", raw, "invalid", "again") is None
    assert sq.owner_query("SELECT message->>'error' FROM pgmq.q_llm_requests_dlq") == [("first",)]


async def test_a_message_read_more_often_than_its_attempts_is_dead_lettered_unhandled(sq, store):
    """Consumers that died holding it (each read counted, no verdict) leave `read_ct` above `max_attempts`:
    the next consumer dead-letters it as attempts_exhausted instead of handing it to a handler again."""
    request = llm_request()
    msg_id = await (await sq.queue("singularity_1")).publish(request)
    nexus = await sq.queue("nexus")
    for _ in range(FAST_RETRY.max_attempts):  # three consumers read it and died; its timeout passed each time
        [raw] = await nexus.read("llm_requests", visibility_timeout=0, limit=1)
    assert raw.read_ct == FAST_RETRY.max_attempts
    handled: list[int] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        handled.append(delivery.msg_id)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store, policy=FAST_RETRY)
    assert await consumer.run_once() == 1
    assert handled == []
    [(letter,)] = sq.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")
    assert (letter["reason"], letter["attempts"], letter["source_msg_id"]) == ("attempts_exhausted", 4, msg_id)
    assert letter["error"] == "read 4 times without completing"
    assert c.LlmRequest.model_validate(letter["message"]) == request
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests") == [(0,)]
    assert service_rows(sq, "SELECT count(*) FROM processed_messages") == [(0,)]


async def test_back_off_grows_exponentially_with_jitter_up_to_its_ceiling(sq, store):
    """The delays are read from pgmq itself: each failed message's `vt` after its failure."""
    policy = RetryPolicy(max_attempts=5, base_delay=10.0, max_delay=30.0)
    singularity = await sq.queue("singularity_1")
    await singularity.publish_batch([llm_request(agent_id=f"a{n}") for n in range(20)])
    nexus = await sq.queue("nexus")

    async def fails(delivery: Delivery[c.LlmRequest]) -> None:
        raise ConnectionResetError("provider hiccup")

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, fails, store=store, policy=policy, batch_size=20)
    delays: dict[int, list[float]] = {}
    for attempt in (1, 2, 3, 4):
        assert await consumer.run_once() == 20
        rows = sq.owner_query(
            "SELECT read_ct, extract(epoch FROM vt - clock_timestamp())::float FROM pgmq.q_llm_requests"
        )
        assert {read_ct for read_ct, _ in rows} == {attempt}
        delays[attempt] = [delay for _, delay in rows]
        sq.owner_query("UPDATE pgmq.q_llm_requests SET vt = now() RETURNING 1")  # let the back-off pass
    # Attempt n waits between half and all of min(30, 10 * 2^(n-1)) seconds.
    for attempt, ceiling in [(1, 10.0), (2, 20.0), (3, 30.0), (4, 30.0)]:
        assert all(ceiling / 2 - 0.5 <= d <= ceiling for d in delays[attempt]), (attempt, delays[attempt])
    assert min(delays[2]) > max(delays[1]) - 0.5  # it grows: every second wait is longer than any first one
    medians = [sorted(delays[attempt])[10] for attempt in (1, 2, 3)]
    assert medians[0] < medians[1] < medians[2]
    for attempt in (1, 2, 3, 4):
        assert len({round(d, 2) for d in delays[attempt]}) >= 10, attempt  # jittered: 20 messages, 20 delays
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests_dlq") == [(0,)]
