"""Wake consumers the moment a message lands, via pgmq's insert notifications.

The listener owns one dedicated connection that does nothing but LISTEN (psycopg hangs if a
query runs on a connection inside `notifies()`). After every (re)connect it wakes all
consumers, since notifications sent while it was away are lost; consumers keep a fallback poll
for delayed messages and expired visibility timeouts, which send no notification.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)


def channel(queue: str) -> str:
    return f"pgmq.q_{queue}.INSERT"


class NotifyListener:
    def __init__(self, dsn: str, queues: Iterable[str], *, health_check_every: float = 5.0) -> None:
        self.dsn = dsn
        self.events = {q: asyncio.Event() for q in queues}
        self.health_check_every = health_check_every
        self.connected = asyncio.Event()
        self._by_channel = {channel(q): q for q in self.events}

    def event(self, queue: str) -> asyncio.Event:
        return self.events[queue]

    def _wake_all(self) -> None:
        for event in self.events.values():
            event.set()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with back-off."""
        delay = 0.1
        while True:
            try:
                await self._listen()
            except (psycopg.OperationalError, OSError) as error:
                self.connected.clear()
                log.warning("notify listener lost its connection (%s); reconnecting", error.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                self._wake_all()

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            for name in self._by_channel:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
            self.connected.set()
            self._wake_all()
            while True:
                async for note in conn.notifies(timeout=self.health_check_every):
                    queue = self._by_channel.get(note.channel)
                    if queue:
                        self.events[queue].set()
                await conn.execute("SELECT 1")  # a dead connection raises here
