"""The shared-queue client on real PostgreSQL + pgmq, each service connecting as its own role."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from singularity_stack import contract as c
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, NotifyListener, RetryPolicy
from singularity_stack.sharedqueue.consumer import Outcome

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


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


async def test_publish_consume_archive(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    request = llm_request()
    msg_id = await singularity.publish(request)
    seen: list[Delivery[c.LlmRequest]] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        seen.append(delivery)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle)
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


async def test_replies_go_to_the_recipients_own_queue(sq):
    nexus = await sq.queue("nexus")
    request = llm_request()
    await nexus.publish(c.LlmResult(**c.reply_fields(request), result="done", model="offline/echo"))
    rows = sq.owner_query("SELECT message->>'request_id' FROM pgmq.q_llm_results_singularity_1")
    assert rows == [(str(request.request_id),)]


async def test_publishing_invalid_data_names_the_field_and_sends_nothing(sq):
    singularity = await sq.queue("singularity_1")
    with pytest.raises(c.InvalidMessage, match="messages: List should have at least 1 item"):
        await singularity.publish_data(
            "llm_requests", {"reply_to": "singularity_1", "agent_id": "a", "task_type": "coder", "messages": []}
        )
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests") == [(0,)]


async def test_invalid_consumed_message_is_dead_lettered_and_the_consumer_goes_on(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    await singularity.send_raw("llm_requests", {"agent_id": "a", "task_type": "coder"})  # no messages, no reply_to
    await singularity.send_raw("llm_requests", "not even an object")
    good = await singularity.publish(llm_request())
    handled: list[int] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        handled.append(delivery.msg_id)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle)
    await settle(consumer, sq)
    assert handled == [good]
    letters = [c.DeadLetter.model_validate(r[0]) for r in sq.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")]
    assert [letter.reason for letter in letters] == ["invalid", "invalid"]
    assert "reply_to: Field required" in letters[0].error
    assert "messages: Field required" in letters[0].error
    assert letters[0].message == {"agent_id": "a", "task_type": "coder"}  # the original, untouched
    assert letters[1].message == "not even an object"
    assert consumer.stats.counts[Outcome.DEAD] == 2


async def test_failures_are_retried_with_backoff_then_succeed(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    await singularity.publish(llm_request())
    attempts: list[int] = []

    async def flaky(delivery: Delivery[c.LlmRequest]) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 3:
            raise ConnectionResetError("provider hiccup")

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, flaky, policy=RetryPolicy(3, 0.05, 0.2))
    await consumer.run_once()
    # back-off: the message is invisible right after the failure
    assert await consumer.run_once() == 0
    await settle(consumer, sq)
    assert attempts == [1, 2, 3]
    assert consumer.stats.counts[Outcome.RETRY] == 2
    assert consumer.stats.counts[Outcome.HANDLED] == 1
    assert sq.owner_query("SELECT read_ct FROM pgmq.a_llm_requests") == [(3,)]


async def test_poison_message_ends_in_the_dead_letter_queue_with_its_reason(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    request = llm_request()
    await singularity.publish(request)

    async def poisoned(delivery: Delivery[c.LlmRequest]) -> None:
        raise ValueError("model refused the prompt")

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, poisoned, policy=FAST_RETRY)
    await settle(consumer, sq)
    [(body,)] = sq.owner_query("SELECT message FROM pgmq.q_llm_requests_dlq")
    letter = c.DeadLetter.model_validate(body)
    assert (letter.reason, letter.attempts, letter.source_queue) == ("failed", 3, "llm_requests")
    assert letter.error == "ValueError: model refused the prompt"
    assert c.LlmRequest.model_validate(letter.message) == request
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_llm_requests") == [(0,)]


async def test_expired_request_is_dead_lettered_not_handled(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    await singularity.publish(llm_request(deadline=datetime.now(UTC) - timedelta(seconds=1)))

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        raise AssertionError("an expired request must not be handled")

    await settle(Consumer(nexus, "llm_requests", c.LlmRequest, handle), sq)
    [(reason,)] = sq.owner_query("SELECT message->>'reason' FROM pgmq.q_llm_requests_dlq")
    assert reason == "expired"


async def test_redelivered_request_id_is_processed_once(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    pool = await sq.db_pool("nexus")
    request = llm_request()
    await singularity.publish(request)
    await singularity.publish(request)  # e.g. a publish retried after a lost acknowledgement
    handled: list[uuid.UUID] = []

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        assert delivery.db is not None  # the handler's writes share the claim's transaction
        handled.append(delivery.message.request_id)

    store = IdempotencyStore(pool)
    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, idempotency=store)
    await settle(consumer, sq)
    assert handled == [request.request_id]
    assert consumer.stats.counts[Outcome.DUPLICATE] == 1
    assert await store.processed("llm_requests", request.request_id, "singularity_1")
    assert sq.owner_query("SELECT count(*) FROM pgmq.a_llm_requests") == [(2,)]


async def test_a_failed_handler_leaves_no_claim_so_the_retry_runs(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    store = IdempotencyStore(await sq.db_pool("nexus"))
    request = llm_request()
    await singularity.publish(request)
    calls = 0

    async def fails_once(delivery: Delivery[c.LlmRequest]) -> None:
        nonlocal calls
        calls += 1
        assert delivery.db is not None
        await delivery.db.execute("CREATE TABLE IF NOT EXISTS effects (request_id uuid PRIMARY KEY)")
        await delivery.db.execute("INSERT INTO effects VALUES (%s)", (delivery.message.request_id,))
        if calls == 1:
            raise RuntimeError("crash after the write")

    await settle(Consumer(nexus, "llm_requests", c.LlmRequest, fails_once, idempotency=store, policy=FAST_RETRY), sq)
    assert calls == 2
    async with store.pool.connection() as conn:
        rows = await (await conn.execute("SELECT request_id FROM effects")).fetchall()
    assert rows == [(request.request_id,)]


async def test_notify_wakes_the_consumer_without_polling(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    listener = NotifyListener(sq.url("nexus"), ["llm_requests"])
    listening = asyncio.create_task(listener.run())
    got = asyncio.Event()

    async def handle(delivery: Delivery[c.LlmRequest]) -> None:
        got.set()

    consumer = Consumer(
        nexus, "llm_requests", c.LlmRequest, handle, poll_interval=3600, wakeup=listener.event("llm_requests")
    )
    stop = asyncio.Event()
    await asyncio.wait_for(listener.connected.wait(), 10)
    consuming = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(0.2)  # the consumer has read nothing and now waits (an hour, were it polling)
    await singularity.publish(llm_request())
    await asyncio.wait_for(got.wait(), 10)
    stop.set()
    await asyncio.wait_for(consuming, 10)
    listening.cancel()


async def test_graceful_stop_finishes_the_message_in_hand(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    await singularity.publish(llm_request())
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(delivery: Delivery[c.LlmRequest]) -> None:
        started.set()
        await release.wait()

    stop = asyncio.Event()
    task = asyncio.create_task(Consumer(nexus, "llm_requests", c.LlmRequest, slow).run(stop))
    await asyncio.wait_for(started.wait(), 10)
    stop.set()
    release.set()
    await asyncio.wait_for(task, 10)
    assert sq.owner_query("SELECT count(*) FROM pgmq.a_llm_requests") == [(1,)]


async def test_cancelled_consumer_makes_in_flight_messages_visible_at_once(sq):
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    msg_id = await singularity.publish(llm_request())
    started = asyncio.Event()

    async def stuck(delivery: Delivery[c.LlmRequest]) -> None:
        started.set()
        await asyncio.sleep(3600)

    consumer = Consumer(nexus, "llm_requests", c.LlmRequest, stuck, visibility_timeout=3600)
    task = asyncio.create_task(consumer.run(asyncio.Event()))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    again = await nexus.read("llm_requests", visibility_timeout=30, limit=10)  # not after an hour: now
    assert [(m.msg_id, m.read_ct) for m in again] == [(msg_id, 2)]


async def test_metrics_show_depth_and_age(sq):
    singularity = await sq.queue("singularity_1")
    owner = await sq.queue("centralcloud")
    await singularity.publish_batch([llm_request() for _ in range(3)])
    metrics = {m.queue: m for m in await owner.metrics_all()}
    assert metrics["llm_requests"].length == 3
    assert metrics["job_requests"].length == 0
    assert json.dumps(sorted(metrics))  # every queue reported, serialisable for /metrics
    assert "llm_results_singularity_1_dlq" in metrics


async def test_concurrency_bounds_handlers_in_flight_within_a_batch(sq):
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

    parallel = Consumer(nexus, "llm_requests", c.LlmRequest, slow, batch_size=6, concurrency=3)
    assert await parallel.run_once() == 6
    assert peak == 3
    await singularity.publish_batch([llm_request() for _ in range(4)])
    peak = 0
    in_order = Consumer(nexus, "llm_requests", c.LlmRequest, slow, batch_size=4)
    assert await in_order.run_once() == 4
    assert peak == 1


async def test_messages_inside_the_notify_throttle_window_are_not_left_waiting(sq):
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
        nexus, "llm_requests", c.LlmRequest, handle, poll_interval=3600, wakeup=listener.event("llm_requests")
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
