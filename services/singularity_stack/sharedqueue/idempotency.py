"""Exactly-once handling on top of at-least-once delivery, in the consuming service's own database.

A handler runs inside a transaction that first records (queue, sender, request_id) in
`processed_messages`: a request id is its sender's, so another instance reusing it is not a
duplicate (`sender` is "" where a queue has no vouched sender: reply queues). A redelivered
message finds its row and is skipped; a handler that fails rolls the row back, so the retry
runs it again. Two consumers racing on the same message serialize on the primary key: the
second waits, then sees the first's row.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True)
class Claim:
    """`fresh` is False when the message was processed before; `db` is the open transaction."""

    fresh: bool
    db: psycopg.AsyncConnection[TupleRow]


class IdempotencyStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def claim(self, queue: str, request_id: uuid.UUID, sender: str) -> AsyncIterator[Claim]:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO processed_messages (queue, sender, request_id) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (queue, sender, request_id),
            )
            yield Claim(fresh=await cur.fetchone() is not None, db=conn)

    async def processed(self, queue: str, request_id: uuid.UUID, sender: str) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM processed_messages WHERE queue = %s AND sender = %s AND request_id = %s",
                (queue, sender, request_id),
            )
            return await cur.fetchone() is not None
