"""Reading a work queue's NATS JetStream stream with the same handler and contract as its pgmq Consumer.

Dual operation (the migration from NATS): a service reads its queues from pgmq and, beside it, from
their streams (nats_streams.py), through its durable pull consumer with explicit acks. A NATS message
gets what a pgmq one gets: validated with the queue's pydantic model, its `Delivery` in a transaction
of the service's database that also claims it in the `IdempotencyStore`, and at the end exactly one of:
archived in pgmq's archive of the queue (handled, or a duplicate), redelivered later (failed, attempts
left), dead-lettered in pgmq's `<queue>_dlq` with the reason. It is acknowledged only after that: a
reader that dies before has it redelivered (after the consumer's ack wait), and the claim makes the
redelivery a duplicate if the handler had committed.

Who sent it. The claim is keyed (queue, sender, request_id), as on pgmq, so one request reaching a
service on both paths is handled once. On pgmq the sender is the login role PostgreSQL writes into the
headers; on NATS it is the last token of the subject (`<root>.req.<kind>.<sender>`). nats-server vouches
for it: each instance's user may publish only on subjects ending in its own name (nats_permissions.py),
so the token is the authenticated user that published. NATS headers are not used for it, nor for
anything else that matters: the server passes them on as the publisher wrote them. A request whose
`reply_to` is not its subject's sender is dead-lettered as `forged_sender`, as on pgmq.

The archive row. pgmq's archive `pgmq.a_<queue>` keys rows by msg_id, which the reader must make up: a
NATS message has no pgmq id. It is negative, `-(consumer created, in seconds since 2020, << 32 | stream
sequence)`, so it never meets pgmq's positive ids and is the same for every redelivery of the message:
archiving is `ON CONFLICT DO NOTHING`, idempotent like the rest. The consumer role already holds what that
needs (INSERT on the archive, SELECT on its msg_id: the consume grant), so no new grant. The headers say
`"path": "nats"`, with the subject, stream sequence and the vouched sender.

Infrastructure trouble (a database or nats-server away) is never the message's fault: the reader keeps
the message, tells the server it is still at work on it, and tries again; unlike pgmq's `read_ct`, a
delivery cannot be given back, so only a reader that died costs a message an attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import nats.errors
import psycopg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from psycopg import sql
from psycopg.rows import TupleRow
from pydantic import ValidationError

from singularity_stack.contract import (
    DeadLetter,
    DeadLetterReason,
    Message,
    Reply,
    Request,
    describe_validation_error,
)
from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.sharedqueue.client import SharedQueue
from singularity_stack.sharedqueue.consumer import AfterCommit, Delivery, Outcome, RetryPolicy
from singularity_stack.sharedqueue.errors import Permanent, RetryAfter, Unavailable
from singularity_stack.sharedqueue.idempotency import IdempotencyStore, Key
from singularity_stack.sharedqueue.metrics import NATS_LAST_MESSAGE, NATS_MESSAGES
from singularity_stack.topology import StackLayout, dead_letter_queue

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
PATH = "nats"
_EPOCH = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp())


@dataclass(frozen=True, slots=True)
class NatsDelivery(Delivery[M]):
    """A Delivery of a message read from NATS: its reply goes back on NATS (nats_replies.py)."""

    subject: str = ""
    stream_seq: int = 0


Handler = Callable[[Delivery[M]], Awaitable[None]]


def archive_id(consumer_created: datetime, stream_seq: int) -> int:
    """The negative msg_id of a NATS message's pgmq archive row (see the module's docstring)."""
    seconds = max(int(consumer_created.timestamp()) - _EPOCH, 0)
    return -((seconds << 32) | (stream_seq & 0xFFFFFFFF))


def reply_archive_id(queue: str, request_id: str) -> int:
    """A reply's archive msg_id: negative (62 bits of a hash), the same for every copy of one reply, so the
    replier (nats_replies.py) and the instance reading it here write one row between them."""
    digest = hashlib.blake2b(f"{queue}:{request_id}".encode(), digest_size=8).digest()
    return -(int.from_bytes(digest, "big") >> 2) - 1


def storable(value: Any) -> Any:
    """`value` with what PostgreSQL's jsonb refuses replaced: U+0000 by ␀ (U+2400), lone surrogates by
    U+FFFD. A NATS message may carry them; a pgmq message never could."""
    if isinstance(value, str):
        text = value.replace("\x00", "\u2400")
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text) if _surrogates(text) else text
    if isinstance(value, list):
        return [storable(item) for item in value]
    if isinstance(value, dict):
        return {storable(str(key)): storable(item) for key, item in value.items()}
    return value


def _surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _unstorable(value: Any) -> bool:
    """Whether a parsed JSON value holds text PostgreSQL cannot store."""
    if isinstance(value, str):
        return "\x00" in value or _surrogates(value)
    if isinstance(value, list):
        return any(_unstorable(item) for item in value)
    if isinstance(value, dict):
        return any(_unstorable(key) or _unstorable(item) for key, item in value.items())
    return False


class _Infrastructure(Exception):
    """A database went away while a message was handled: not the message's fault."""


@dataclass
class _Checked(Generic[M]):
    message: M
    key: Key


class NatsReader(Generic[M]):
    """Reads `queue`'s stream through `service`'s durable consumer and settles each message as above."""

    def __init__(
        self,
        nc: Client,
        layout: StackLayout,
        service: str,
        queue: str,
        model: type[M],
        handler: Handler[M],
        *,
        client: SharedQueue,
        store: IdempotencyStore,
        policy: RetryPolicy | None = None,
        batch_size: int = 10,
        concurrency: int = 1,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.layout = layout
        self.queue = queue
        self.model = model
        self.handler = handler
        self.client = client
        self.store = store
        self.policy = policy or RetryPolicy()
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.fetch_timeout = fetch_timeout
        self.stream = subjects.stream(layout, queue)
        self.consumer = subjects.durable(service)
        self._settled = {outcome: NATS_MESSAGES.labels(queue, outcome.value) for outcome in Outcome}
        self._last_message = NATS_LAST_MESSAGE.labels(queue)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._consumer_created: datetime | None = None
        self._ack_wait = 30.0

    # -- the loop --------------------------------------------------------------------------------

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        if self._sub is None:
            info = await self.js.consumer_info(self.stream, self.consumer)
            self._consumer_created = info.created or datetime.fromtimestamp(_EPOCH, UTC)
            self._ack_wait = info.config.ack_wait or self._ack_wait
            self._sub = await self.js.pull_subscribe_bind(self.consumer, self.stream)
        return self._sub

    async def run_once(self) -> int:
        """Fetch one batch (waiting up to `fetch_timeout` for it) and settle every message; how many came."""
        sub = await self._subscribe()
        try:
            msgs = await sub.fetch(self.batch_size, timeout=self.fetch_timeout)
        except TimeoutError:  # nats.errors.TimeoutError is one, and fetch raises either
            return 0
        slots = asyncio.Semaphore(self.concurrency)

        async def bounded(msg: Msg) -> None:
            async with slots:
                await self.settle(msg)

        results = await asyncio.gather(*(bounded(msg) for msg in msgs), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            raise failures[0]
        return len(msgs)

    async def run(self, stop: asyncio.Event) -> None:
        """Read until `stop` is set (the batch in hand is finished first), riding out nats-server restarts."""
        delay = 0.1
        while not stop.is_set():
            try:
                await self.run_once()
                delay = 0.1
            except (TimeoutError, nats.errors.Error, OSError) as error:
                log.warning("NATS stream %s: %s; retrying", self.stream, error.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except Exception:
                # Never let one bad batch stop reading for good: log it, back off, read again.
                log.exception("NATS stream %s: a batch failed; retrying", self.stream)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- one message -----------------------------------------------------------------------------

    async def settle(self, msg: Msg) -> Outcome:
        """Settle one delivered message and acknowledge it (or ask for it later); returns what became of it."""
        self._last_message.set(time.time())
        keepalive = asyncio.ensure_future(self._keep_alive(msg))
        try:
            outcome, delay, callbacks = await self._until_done(msg)
        except asyncio.CancelledError:
            # A shutdown: hand the message back now rather than after the ack wait.
            await asyncio.shield(_quietly(msg.nak()))
            raise
        finally:
            keepalive.cancel()
        self._settled[outcome].inc()
        if outcome is Outcome.RETRY:
            await _quietly(msg.nak(delay=delay))
            return outcome
        if outcome in (Outcome.HANDLED, Outcome.DUPLICATE):
            await _run_callbacks(self.queue, callbacks)
            await self._until_done_infra(lambda: self._archive(msg))
        await _quietly(msg.ack_sync())
        return outcome

    async def _keep_alive(self, msg: Msg) -> None:
        """Tell the server the message is being worked on, so a slow handler is not taken for a dead reader."""
        while True:
            await asyncio.sleep(self._ack_wait / 3)
            await _quietly(msg.in_progress())

    async def _until_done(self, msg: Msg) -> tuple[Outcome, float, list[AfterCommit]]:
        result: list[tuple[Outcome, float, list[AfterCommit]]] = []

        async def attempt() -> None:
            result.append(await self._process(msg))

        await self._until_done_infra(attempt)
        return result[-1]

    async def _until_done_infra(self, operation: Callable[[], Awaitable[None]]) -> None:
        """Run `operation` until no database is away; the message stays ours (the keep-alive holds it)."""
        delay = 0.1
        while True:
            try:
                await operation()
                return
            except (_Infrastructure, Unavailable, psycopg.OperationalError) as error:
                log.warning("NATS stream %s: a database is unavailable (%s); retrying", self.stream, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _process(self, msg: Msg) -> tuple[Outcome, float, list[AfterCommit]]:
        attempt = msg.metadata.num_delivered
        if attempt > self.policy.max_attempts:
            return await self._dead(msg, "attempts_exhausted", f"delivered {attempt} times without completing")
        checked = await self._check(msg)
        if isinstance(checked, Outcome):
            return checked, 0.0, []
        conn: psycopg.AsyncConnection[TupleRow] | None = None
        try:
            async with self.store.pool.connection() as conn, conn.transaction():
                if not await self.store.claim(conn, self.model.queue, [checked.key]):
                    return Outcome.DUPLICATE, 0.0, []
                delivery = NatsDelivery(
                    checked.message,
                    msg.metadata.sequence.stream,
                    attempt,
                    self.queue,
                    conn,
                    checked.key[0] or None,
                    subject=msg.subject,
                    stream_seq=msg.metadata.sequence.stream,
                )
                try:
                    await self.handler(delivery)
                except Exception as error:
                    if isinstance(error, Unavailable) or (isinstance(error, psycopg.OperationalError) and conn.broken):
                        raise _Infrastructure(str(error)) from error
                    raise
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                    raise RuntimeError("the handler swallowed a database error; its transaction was aborted")
        except (_Infrastructure, Unavailable):
            raise
        except psycopg.OperationalError as error:
            if conn is None or conn.broken:
                raise _Infrastructure(str(error)) from error
            return await self._failed(msg, error)
        except Exception as error:
            return await self._failed(msg, error)
        return Outcome.HANDLED, 0.0, list(delivery._after_commit)

    async def _check(self, msg: Msg) -> _Checked[M] | Outcome:
        try:
            message = self.model.model_validate_json(msg.data)
        except ValidationError as error:
            return (await self._dead(msg, "invalid", describe_validation_error(error)))[0]
        if _unstorable(json.loads(msg.data)):
            return (await self._dead(msg, "invalid", "text with U+0000 or a lone surrogate cannot be stored"))[0]
        sender = ""
        if isinstance(message, Request):
            vouched = subjects.parse_request_subject(self.layout, msg.subject)
            if vouched is None or vouched.kind != self.model.queue:
                return (await self._dead(msg, "forged_sender", f"subject {msg.subject} names no sender"))[0]
            if vouched.sender != message.reply_to:
                reason = f"reply_to {message.reply_to} but sent by {vouched.sender} (NATS subject {msg.subject})"
                return (await self._dead(msg, "forged_sender", reason))[0]
            sender = vouched.sender
        if message.deadline is not None and message.expired():
            return (await self._dead(msg, "expired", f"deadline {message.deadline.isoformat()} passed"))[0]
        return _Checked(message, (sender, message.request_id))

    async def _failed(self, msg: Msg, error: Exception) -> tuple[Outcome, float, list[AfterCommit]]:
        if isinstance(error, Permanent):
            return await self._dead(msg, "permanent", error.reason)
        attempt = msg.metadata.num_delivered
        reason = f"{error.__class__.__name__}: {error}"
        if attempt >= self.policy.max_attempts:
            return await self._dead(msg, "failed", reason)
        delay = error.seconds if isinstance(error, RetryAfter) else self.policy.delay(attempt)
        log.info("NATS stream %s message %s failed (%s); retry in %.1fs", self.stream, msg.subject, reason, delay)
        return Outcome.RETRY, delay, []

    # -- pgmq: dead letters and the archive --------------------------------------------------------

    def _headers(self, msg: Msg) -> dict[str, Any]:
        """What the archive and dead letters record of a NATS message: the vouched facts, and the
        publisher's own headers under `nats_headers` (unvouched)."""
        vouched = subjects.parse_request_subject(self.layout, msg.subject)
        headers: dict[str, Any] = {
            "path": PATH,
            "nats_subject": msg.subject,
            "nats_stream": self.stream,
            "nats_stream_seq": msg.metadata.sequence.stream,
        }
        if vouched is not None:
            headers["sender"] = vouched.sender
            headers["sender_role"] = subjects.user(self.layout, vouched.sender)
        if msg.headers:
            headers["nats_headers"] = dict(msg.headers)
        return dict(storable(headers))

    async def _dead(self, msg: Msg, reason: DeadLetterReason, error: str) -> tuple[Outcome, float, list[AfterCommit]]:
        log.warning("NATS stream %s message %s dead-lettered (%s): %s", self.stream, msg.subject, reason, error)
        text = msg.data.decode("utf-8", "replace")
        try:
            original: Any = json.loads(text)
        except ValueError:
            original = text
        letter = DeadLetter(
            source_queue=self.queue,
            source_msg_id=archive_id(self._created, msg.metadata.sequence.stream),
            attempts=msg.metadata.num_delivered,
            reason=reason,
            error=storable(error),
            message=storable(original),
            headers=self._headers(msg),
            enqueued_at=msg.metadata.timestamp,
        )
        # A reader that dies between this and the ack sends the dead letter again on the redelivery.
        await self.client.query(
            "SELECT * FROM pgmq.send(%s, %s::jsonb)", (dead_letter_queue(self.queue), letter.model_dump_json())
        )
        return Outcome.DEAD, 0.0, []

    @property
    def _created(self) -> datetime:
        assert self._consumer_created is not None  # learnt before the first fetch
        return self._consumer_created

    async def _archive(self, msg: Msg) -> None:
        message = self.model.model_validate_json(msg.data)
        # A reply was archived by its replier already, under an id of its own: the same row, not a second.
        msg_id = (
            reply_archive_id(self.queue, str(message.request_id))
            if isinstance(message, Reply)
            else archive_id(self._created, msg.metadata.sequence.stream)
        )
        await self.client.query(
            sql.SQL(
                "INSERT INTO {} (msg_id, read_ct, enqueued_at, vt, message, headers) "
                "VALUES (%s, %s, %s, clock_timestamp(), %s::jsonb, %s::jsonb) "
                "ON CONFLICT (msg_id) DO NOTHING RETURNING msg_id"
            ).format(sql.Identifier("pgmq", f"a_{self.queue}")),
            (
                msg_id,
                msg.metadata.num_delivered,
                msg.metadata.timestamp,
                message.model_dump_json(),
                json.dumps(self._headers(msg)),
            ),
        )


async def _quietly(operation: Awaitable[Any]) -> None:
    """An ack, nak or progress signal that may fail (nats-server away): the message is then redelivered,
    and the claim or the archive's key makes that harmless."""
    try:
        await operation
    except (TimeoutError, nats.errors.Error, OSError) as error:
        log.warning("NATS: could not acknowledge a message (%s); it will be redelivered", error.__class__.__name__)


async def _run_callbacks(queue: str, callbacks: Sequence[AfterCommit]) -> None:
    """After-commit callbacks, in order; one that fails is logged and never undoes the message."""
    for callback in callbacks:
        try:
            result = callback()
            if result is not None:
                await result
        except Exception:
            log.exception("NATS %s: an after-commit callback failed", queue)
