"""Every Nexus replica's browsers see every HITL change, whichever replica made it.

Each change to `hitl_requests` (a request held, decided, expired) also sends a NOTIFY on Nexus's own
database inside the transaction that makes it, so PostgreSQL delivers it only on commit, to every replica
listening. A replica shows its own changes at once (the Broadcaster, after the commit) and skips its own
notifications by their origin; the others load the card from the database and fan it out to their browsers.
A replica that loses its listening connection tells its browsers to resync (a fresh snapshot), since
changes made meanwhile were not heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.rows import TupleRow

log = logging.getLogger(__name__)
CHANNEL = "hitl_events"
RECONNECT_SECONDS = 1.0


async def notify(conn: psycopg.AsyncConnection[TupleRow], origin: str, event: dict[str, Any]) -> None:
    """Queue a change for the other replicas inside the caller's transaction (sent on commit only).
    `event` holds ids and states only: a card (up to its diff) is read from the database, never sent."""
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps({"origin": origin, **event})))


def new_origin() -> str:
    """One per process: a replica recognises (and skips) the notifications it sent itself."""
    return uuid.uuid4().hex


class HitlFeed:
    """Listens on Nexus's database (one connection that does nothing else: psycopg hangs if a query runs
    inside `notifies()`) and hands other replicas' changes to `deliver`."""

    def __init__(
        self,
        database_url: str,
        origin: str,
        deliver: Callable[[dict[str, Any]], Awaitable[None]],
        resync: Callable[[], None],
        *,
        check_every: float = 1.0,
    ) -> None:
        self.database_url = database_url
        self.origin = origin
        self.deliver = deliver
        self.resync = resync
        self.check_every = check_every
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until `stop` is set, reconnecting after a lost connection."""
        heard_before = False
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    if heard_before:
                        self.resync()  # what changed while we were not listening was not heard
                    heard_before = True
                    while not stop.is_set():
                        async for note in conn.notifies(timeout=self.check_every):
                            await self._hear(note.payload)
                        await conn.execute("SELECT 1")  # a dead connection raises here
            except (psycopg.OperationalError, OSError) as error:
                log.warning("HITL feed lost its connection (%s); reconnecting", error.__class__.__name__)
            finally:
                self.connected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RECONNECT_SECONDS)

    async def _hear(self, payload: str) -> None:
        """One notification: another replica's change goes to `deliver`; one that is not ours to read (bad
        JSON, missing fields) is logged and skipped, never the end of the feed."""
        try:
            event = json.loads(payload)
            if not isinstance(event, dict):
                raise ValueError("not an object")
            if event.pop("origin", None) != self.origin:
                await self.deliver(event)
        except psycopg.OperationalError:
            raise  # the connection: reconnect and resync
        except Exception as error:  # anything a payload can provoke (even a RecursionError) ends one, not the feed
            log.warning("HITL feed: skipped a notification it cannot read (%r): %.200s", error, payload)
