"""Nexus on several replicas: every change to the held requests reaches every replica's browsers.

Two Hitl instances with their own pools and feeds stand for two Nexus replicas on one database (real
PostgreSQL; the feeds hear each other only through NOTIFY on the nexus database). The browser test with
two Nexus processes is in test_nexus_ui_browser.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from test_nexus_hitl import approval, deliver

from singularity_stack.nexus.hitl import RESYNC, Event, Hitl


@pytest.fixture
async def replicas(sq) -> AsyncIterator[tuple[Hitl, Hitl]]:
    pair = [Hitl(await sq.db_pool("nexus"), await sq.queue("nexus")) for _ in range(2)]
    stop = asyncio.Event()
    feeds = [hitl.feed(sq.db_url("nexus")) for hitl in pair]
    tasks = [asyncio.create_task(feed.run(stop)) for feed in feeds]
    for feed in feeds:
        await asyncio.wait_for(feed.connected.wait(), 10)
    yield pair[0], pair[1]
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def next_event(inbox: asyncio.Queue[Event]) -> Event:
    return await asyncio.wait_for(inbox.get(), 10)


async def test_a_request_held_and_decided_on_one_replica_shows_on_the_other(replicas):
    one, two = replicas
    request = approval(description="seen everywhere")
    with one.broadcaster.subscribe() as here, two.broadcaster.subscribe() as there:
        await deliver(one, request)
        added = await next_event(there)
        assert added["type"] == "added"
        assert added["card"]["request_id"] == str(request.request_id)
        assert added["card"]["description"] == "seen everywhere"  # the card, read from the database
        await one.decide(request.request_id, True, "", "alice")
        assert await next_event(there) == {
            "type": "removed",
            "request_id": str(request.request_id),
            "state": "approved",
            "by": "alice",
        }
        # The replica that made the changes showed each once: its own notifications are skipped.
        assert [e["type"] for e in (await next_event(here), await next_event(here))] == ["added", "removed"]
        await asyncio.sleep(0.3)  # time for a duplicate to arrive, if one were sent
        assert here.empty() and there.empty()


async def test_a_decision_on_one_replica_and_an_expiry_on_the_other_never_both_win(replicas):
    one, two = replicas
    request = approval(deadline=datetime.now(UTC) + timedelta(seconds=1))
    await deliver(one, request)
    await asyncio.sleep(1.1)  # the deadline passes
    with two.broadcaster.subscribe() as there:
        outcomes = await asyncio.gather(
            one.decide(request.request_id, True, "", "alice"), two.expire_overdue(), return_exceptions=True
        )
        removed = await next_event(there)
    # The deadline passed: the decision is refused, the expiry wins, and each replica's browsers hear of it.
    assert isinstance(outcomes[0], Exception) and "expired" in str(outcomes[0])
    assert outcomes[1] == 1
    assert removed["state"] == "expired"


async def test_a_replica_whose_feed_reconnects_tells_its_browsers_to_resync(replicas, admin_dsn):
    _, two = replicas
    with two.broadcaster.subscribe() as there:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN hitl_events%'"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        events = [await next_event(there)]
        assert RESYNC in events  # changes made while it was not listening were not heard: start over


async def test_a_notification_the_feed_cannot_read_is_skipped_and_the_feed_goes_on(replicas, sq):
    """Only Nexus's role may NOTIFY on its database, but a bad payload (a bug, an older replica) must not stop
    every replica's feed, and a "removed" it hears clears a card only once the database says it is settled."""
    one, two = replicas
    held, after = approval(description="still pending"), approval(description="after the garbage")
    with two.broadcaster.subscribe() as there:
        await deliver(one, held)
        assert (await next_event(there))["card"]["request_id"] == str(held.request_id)
        forged = {"type": "removed", "request_id": str(held.request_id), "state": "approved", "by": "mallory"}
        with psycopg.connect(sq.db_url("nexus"), autocommit=True) as conn:
            for garbage in ("not json", "[1, 2]", '{"type": "added"}', '{"type": "removed", "request_id": 7}',
                            "[" * 4000, json.dumps(forged)):  # fmt: skip
                conn.execute("SELECT pg_notify('hitl_events', %s)", (garbage,))
        await deliver(one, after)
        added = await next_event(there)  # not the forged removal of the pending card
    assert added["type"] == "added" and added["card"]["request_id"] == str(after.request_id)
