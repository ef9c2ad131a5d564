"""The shared-queue client every service uses: pgmq over an async psycopg 3 connection pool.

Calls that fail because the connection or the server went away are retried with back-off
for `retry_for` seconds (PostgreSQL restarts, failovers), then raise `Unavailable`; everything
else raises at once.
A retried publish may deliver twice: receivers deduplicate on `request_id`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from pydantic import TypeAdapter

from singularity_stack.contract import DeadLetter, DeadLetterReason, Message, Reply
from singularity_stack.sharedqueue.errors import Unavailable
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.topology import dead_letter_queue, reply_queue

log = logging.getLogger(__name__)
T = TypeVar("T")


class RawMessage(NamedTuple):
    """A message as pgmq returns it; `body` is the JSON text, parsed by the consumer. A tuple, not a dataclass,
    and its headers left as text until asked for: per message of a batch, a frozen dataclass and parsing
    headers nobody reads cost more than validating the body. `sender` is the headers' `sender` when it is a
    string (read by PostgreSQL, so checking a request's sender parses nothing)."""

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    body: str
    headers_json: str | None
    sender: str | None = None

    @property
    def headers(self) -> Any:
        """The headers as JSON values (a dict, as the provisioner's trigger writes them; None: no headers)."""
        return None if self.headers_json is None else json.loads(self.headers_json)


@dataclass(frozen=True)
class QueueMetrics:
    queue: str
    length: int
    visible: int
    oldest_age_seconds: int | None
    total_messages: int


def queue_for(message: Message) -> str:
    """The physical queue a message goes to: replies go to their recipient's own queue."""
    if isinstance(message, Reply):
        return reply_queue(message.queue, message.recipient)
    return message.queue


@functools.cache
def _list_of(kind: type[Message]) -> TypeAdapter[list[Any]]:
    """A JSON serializer for a list of `kind` (exactly that class): the same JSON as each message's
    `model_dump_json`, without a call into pydantic per message."""
    return TypeAdapter(list[kind])  # type: ignore[valid-type]


SEND_BATCH_SQL = "SELECT * FROM pgmq.send_batch(%s, ARRAY(SELECT jsonb_array_elements(%s::jsonb)))"
_READ_SQL = (
    "SELECT msg_id, read_ct, enqueued_at, message::text, headers::text, "
    "CASE WHEN jsonb_typeof(headers->'sender') = 'string' THEN headers->>'sender' END "
    "FROM pgmq.read(%s, %s, %s)"
)


class SharedQueue:
    """Connection pool + pgmq operations. Open with `async with SharedQueue(dsn) as q:` or `await q.open()`."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        retry_for: float = 60.0,
        name: str = "shared-queue",
    ) -> None:
        self.dsn = dsn
        self.retry_for = retry_for
        self.pool = connection_pool(dsn, min_size=min_size, max_size=max_size, name=name, autocommit=True)

    async def open(self) -> SharedQueue:
        await self.pool.open(wait=False)
        return self

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> SharedQueue:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------------------------

    async def _retrying(self, operation: Callable[[psycopg.AsyncConnection[TupleRow]], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                async with self.pool.connection() as conn:
                    return await operation(conn)
            except psycopg.OperationalError as error:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"shared queue: {error}") from error
                log.warning("shared queue unavailable (%s); retrying in %.2fs", error.__class__.__name__, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)

    async def _rows(self, query: str | sql.Composed, params: Sequence[Any]) -> list[TupleRow]:
        async def run(conn: psycopg.AsyncConnection[TupleRow]) -> list[TupleRow]:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

        return await self._retrying(run)

    async def query(self, query: str | sql.Composed, params: Sequence[Any]) -> list[TupleRow]:
        """One statement on the shared queue, retried like every call here (for the NATS reader's
        dead letters and archive rows, which no pgmq function writes)."""
        return await self._rows(query, params)

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, message: Message, *, delay_seconds: int = 0) -> int:
        """Send one validated message to its queue; returns the pgmq message id."""
        rows = await self._rows(
            "SELECT * FROM pgmq.send(%s, %s::jsonb, %s)", (queue_for(message), message.model_dump_json(), delay_seconds)
        )
        return int(rows[0][0])

    async def publish_batch(self, messages: Sequence[Message]) -> list[int]:
        """Send many messages, one `send_batch` per destination queue; ids come back in input order."""
        by_queue: dict[tuple[str, type[Message]], list[int]] = defaultdict(list)
        for index, message in enumerate(messages):
            by_queue[queue_for(message), type(message)].append(index)
        ids = [0] * len(messages)
        for (queue, kind), indexes in by_queue.items():
            # One JSON array parameter, split server-side: psycopg's text-array quoting of many
            # JSON strings costs more than the whole round trip. Serialized in one call, not one per message.
            bodies = _list_of(kind).dump_json([messages[i] for i in indexes]).decode()
            rows = await self._rows(SEND_BATCH_SQL, (queue, bodies))
            for index, row in zip(indexes, rows, strict=True):
                ids[index] = int(row[0])
        return ids

    # -- consuming -------------------------------------------------------------------------------

    async def read(self, queue: str, *, visibility_timeout: int, limit: int) -> list[RawMessage]:
        rows = await self._rows(_READ_SQL, (queue, visibility_timeout, limit))
        return [RawMessage._make(row) for row in rows]

    async def archive(self, queue: str, msg_ids: Sequence[int]) -> set[int]:
        if not msg_ids:
            return set()
        rows = await self._rows("SELECT * FROM pgmq.archive(%s, %s::bigint[])", (queue, list(msg_ids)))
        return {int(r[0]) for r in rows}

    async def give_back(self, queue: str, msg_ids: Sequence[int]) -> None:
        """Make messages visible at once and undo the read that handed them out (pgmq counts every read in
        `read_ct`, which the consumer takes for attempts): for messages a consumer could not settle through
        no fault of theirs. A reader may update its queue's table, as pgmq.read itself does."""
        if msg_ids:
            await self._rows(
                sql.SQL(
                    "UPDATE pgmq.{} SET vt = clock_timestamp(), read_ct = greatest(read_ct - 1, 0) "
                    "WHERE msg_id = ANY(%s::bigint[]) RETURNING msg_id"
                ).format(sql.Identifier(f"q_{queue}")),
                (list(msg_ids),),
            )

    async def set_visibility(self, queue: str, msg_ids: Sequence[int], seconds: float) -> None:
        """Make messages visible again after `seconds` (0: at once). Used for back-off and release."""
        if msg_ids:
            await self._rows(
                "SELECT msg_id FROM pgmq.set_vt(%s, %s::bigint[], clock_timestamp() + make_interval(secs => %s))",
                (queue, list(msg_ids), seconds),
            )

    async def dead_letter(self, queue: str, raw: RawMessage, reason: DeadLetterReason, error: str) -> int | None:
        """Move a message to `<queue>_dlq` with the reason, atomically: it is never in both or neither."""
        try:
            original: Any = json.loads(raw.body)
        except ValueError:
            original = raw.body
        letter = DeadLetter(
            source_queue=queue,
            source_msg_id=raw.msg_id,
            attempts=raw.read_ct,
            reason=reason,
            error=error,
            message=original,
            headers=raw.headers,
            enqueued_at=raw.enqueued_at,
        )

        async def move(conn: psycopg.AsyncConnection[TupleRow]) -> int | None:
            # Delete first: a move retried after its commit's answer was lost finds nothing to delete and
            # sends no second dead letter.
            async with conn.transaction():
                cur = await conn.execute("SELECT pgmq.delete(%s, %s::bigint)", (queue, raw.msg_id))
                deleted = await cur.fetchone()
                if not (deleted and deleted[0]):
                    return None
                cur = await conn.execute(
                    "SELECT * FROM pgmq.send(%s, %s::jsonb)", (dead_letter_queue(queue), letter.model_dump_json())
                )
                row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        return await self._retrying(move)

    async def stamps_sender(self, queue: str) -> bool:
        """Whether PostgreSQL writes each message's sender into its headers on this queue (the
        provisioner's trigger): without it, a `sender` header is whatever the sender wrote."""
        rows = await self._rows(
            "SELECT 1 FROM pg_trigger "
            "WHERE tgrelid = to_regclass(%s) AND tgname = 'stamp_sender' AND tgenabled IN ('O', 'A')",
            (f"pgmq.q_{queue}",),
        )
        return bool(rows)

    # -- observing -------------------------------------------------------------------------------

    async def metrics_all(self) -> list[QueueMetrics]:
        rows = await self._rows(
            "SELECT queue_name, queue_length, queue_visible_length, oldest_msg_age_sec, total_messages "
            "FROM pgmq.metrics_all()",
            (),
        )
        return [QueueMetrics(str(r[0]), int(r[1]), int(r[2]), r[3], int(r[4])) for r in rows]
