"""Exactly-once handling on top of at-least-once delivery, in the consuming service's own database.

A handler runs inside a transaction that also records (queue, sender, request_id) in
`processed_messages`: a request id is its sender's, so another instance reusing it is not a
duplicate (`sender` is "" where a queue has no vouched sender: reply queues). A redelivered
message finds its row and is skipped; a handler that fails has its effects and its row rolled
back, so the retry runs it again. Two consumers racing on the same message serialize on the
primary key: the second waits, then sees the first's row.

The SQL of the Consumer's transactions lives here: claims (one statement for a whole batch) and
the savepoint around each message of a batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

Key = tuple[str, uuid.UUID]  # (sender, request_id)
Connection = psycopg.AsyncConnection[TupleRow]


class IdempotencyStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def claim(self, conn: Connection, queue: str, keys: Sequence[Key]) -> set[Key]:
        """Record every key not seen before, in `conn`'s transaction; returns those (the fresh ones)."""
        if not keys:
            return set()
        keys = sorted(keys)  # one lock order for every consumer: two claiming the same keys cannot deadlock
        cur = await conn.execute(
            "INSERT INTO processed_messages (queue, sender, request_id) "
            "SELECT %s, sender, request_id FROM unnest(%s::text[], %s::uuid[]) AS k(sender, request_id) "
            "ON CONFLICT DO NOTHING RETURNING sender, request_id",
            (queue, [sender for sender, _ in keys], [request_id for _, request_id in keys]),
        )
        return {(str(sender), request_id) for sender, request_id in await cur.fetchall()}

    async def unclaim(self, conn: Connection, queue: str, key: Key) -> None:
        """Forget a claim whose handler failed, so that the message's next delivery runs it again."""
        await conn.execute(
            "DELETE FROM processed_messages WHERE queue = %s AND sender = %s AND request_id = %s", (queue, *key)
        )

    @staticmethod
    async def mark(conn: Connection, first: bool) -> None:
        """Open the savepoint of the batch's next message (releasing the previous one in the same round trip)."""
        await conn.execute("SAVEPOINT message" if first else "RELEASE SAVEPOINT message; SAVEPOINT message")

    @staticmethod
    async def undo(conn: Connection) -> None:
        """Roll back what the current message did, and only that."""
        await conn.execute("ROLLBACK TO SAVEPOINT message")
