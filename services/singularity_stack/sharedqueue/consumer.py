"""Consuming a queue: read with a visibility timeout, handle, archive; retry with back-off; dead-letter.

Every message ends in exactly one of three places: the archive (handled, or a duplicate of a
handled one), back in the queue with a later visibility time (failed, attempts left), or the
dead-letter queue with the reason (invalid, forged sender, permanent, expired, failed too often).

The handler contract, owned here:
- a handler gets a `Delivery` whose `db` is always an open transaction in the service's own
  database; the message's claim (idempotency.py) is in it too, so its effects happen exactly once;
- `delivery.after_commit(callback)` runs `callback` once the claim and the effects have committed
  (never if they roll back, and never twice); a process that dies in between never runs it, so what
  it stands for must be re-derivable from the database;
- `Permanent(reason)` dead-letters the message now, `RetryAfter(seconds)` retries it then, anything
  else is retried with back-off until `max_attempts`; `Unavailable` (a database went away) abandons
  the batch, which is redelivered, and never counts against a message.

A request is handled only when PostgreSQL vouches for its sender (the `sender` header the
provisioner's trigger writes) and that sender is the instance its `reply_to` names.

With `concurrency` 1 a batch is one transaction; a failing message rolls back alone (the batch is
then run again with a savepoint per message). With more, each message has a transaction of its
own, so slow handlers (LLM calls, code jobs) can run side by side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import psycopg
from psycopg.rows import TupleRow
from pydantic import ValidationError

from singularity_stack.contract import DeadLetterReason, Message, Request, describe_validation_error
from singularity_stack.sharedqueue.client import RawMessage, SharedQueue
from singularity_stack.sharedqueue.errors import Permanent, RetryAfter, Unavailable
from singularity_stack.sharedqueue.idempotency import IdempotencyStore, Key
from singularity_stack.sharedqueue.metrics import BATCH_SECONDS, MESSAGES
from singularity_stack.topology import NOTIFY_THROTTLE_MS

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
AfterCommit = Callable[[], Awaitable[None] | None]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with jitter; after `max_attempts` failed reads the message is dead-lettered."""

    max_attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 300.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** max(attempt - 1, 0))
        return ceiling * (0.5 + random.random() / 2)


@dataclass(frozen=True, slots=True)
class Delivery(Generic[M]):
    """What a handler gets: the parsed message, its attempt number, `db` (the open transaction in the
    service's database that also records the message) and, for a request, `sender`: the instance
    PostgreSQL vouches sent it (always its `reply_to`), whose queues get the reply."""

    message: M
    msg_id: int
    attempt: int
    queue: str
    db: psycopg.AsyncConnection[TupleRow]
    sender: str | None = None
    _after_commit: list[AfterCommit] = field(default_factory=list, repr=False, compare=False, hash=False)

    def after_commit(self, callback: AfterCommit) -> None:
        """Run `callback` (plain or async) once this message's claim and effects have committed."""
        self._after_commit.append(callback)


Handler = Callable[[Delivery[M]], Awaitable[None]]


class Outcome(enum.Enum):
    HANDLED = "handled"
    DUPLICATE = "duplicate"
    RETRY = "retry"
    DEAD = "dead"


@dataclass
class _Pending(Generic[M]):
    """A message of the batch that passed the checks and waits for its handler."""

    raw: RawMessage
    message: M
    key: Key


@dataclass
class _Batch:
    outcomes: dict[int, Outcome] = field(default_factory=dict)  # msg_id -> outcome, once settled
    callbacks: list[AfterCommit] = field(default_factory=list)  # of committed messages, in order


class _HandlerFailed(Exception):
    """A handler failed in a pass without savepoints: that pass must roll back whole."""

    def __init__(self, msg_id: int, error: Exception) -> None:
        super().__init__(msg_id, error)
        self.msg_id = msg_id
        self.error = error


class Consumer(Generic[M]):
    def __init__(
        self,
        client: SharedQueue,
        queue: str,
        model: type[M],
        handler: Handler[M],
        *,
        store: IdempotencyStore,
        policy: RetryPolicy | None = None,
        batch_size: int = 10,
        concurrency: int = 1,
        visibility_timeout: int = 30,
        poll_interval: float = 1.0,
        wakeup: asyncio.Event | None = None,
        notify_throttle: float = NOTIFY_THROTTLE_MS / 1000,
    ) -> None:
        self.client = client
        self.queue = queue
        self.model = model
        self.handler = handler
        self.store = store
        self.policy = policy or RetryPolicy()
        self.batch_size = batch_size
        # Messages of a batch handled at once: 1 (in order, one transaction) suits quick handlers; slow
        # ones (LLM calls, code jobs) set it to the number of calls they may have in flight.
        self.concurrency = concurrency
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.wakeup = wakeup or asyncio.Event()
        self.notify_throttle = notify_throttle
        self._woken_at = float("-inf")
        self._stamps_sender = False  # learnt from the queue's table on the first request read
        # Prometheus children looked up once: labels() per message costs more than the rest of the metric.
        self._settled = {outcome: MESSAGES.labels(queue, outcome.value) for outcome in Outcome}
        self._batch_seconds = BATCH_SECONDS.labels(queue)

    # -- checks before any handler ---------------------------------------------------------------

    async def _dead(self, raw: RawMessage, reason: DeadLetterReason, error: str) -> Outcome:
        log.warning("queue %s message %s dead-lettered (%s): %s", self.queue, raw.msg_id, reason, error)
        await self.client.dead_letter(self.queue, raw, reason, error)
        return Outcome.DEAD

    async def _forged(self, message: Request, raw: RawMessage) -> str | None:
        """Why `message` cannot be answered as its `reply_to` (None: PostgreSQL vouches it is theirs)."""
        if not self._stamps_sender:
            self._stamps_sender = await self.client.stamps_sender(self.queue)
        if not self._stamps_sender:
            return f"queue {self.queue} does not record senders (provision the stack again): no sender is vouched"
        sender = raw.sender
        if sender is None:
            role = _sender_role(raw)
            return f"no sender vouched by PostgreSQL (role {role!r}, or sent before senders were recorded)"
        if sender != message.reply_to:
            return f"reply_to {message.reply_to} but sent by {sender} (role {_sender_role(raw)})"
        return None

    async def _check(self, raw: RawMessage) -> _Pending[M] | Outcome:
        """The message ready for its handler, or what became of it (dead-lettered) when it is not."""
        if raw.read_ct > self.policy.max_attempts:
            # Read more often than allowed without a verdict: earlier consumers died on it.
            return await self._dead(raw, "attempts_exhausted", f"read {raw.read_ct} times without completing")
        try:
            message = self.model.model_validate_json(raw.body)
        except ValidationError as error:
            return await self._dead(raw, "invalid", describe_validation_error(error))
        sender = ""
        if isinstance(message, Request):
            forged = await self._forged(message, raw)
            if forged is not None:
                return await self._dead(raw, "forged_sender", forged)
            sender = message.reply_to
        if message.deadline is not None and message.expired():
            return await self._dead(raw, "expired", f"deadline {message.deadline.isoformat()} passed")
        return _Pending(raw, message, (sender, message.request_id))

    async def _failed(self, raw: RawMessage, error: Exception) -> Outcome:
        """A handler raised: dead-letter now, retry when it says, or back off; its effects are gone."""
        if isinstance(error, Permanent):
            return await self._dead(raw, "permanent", error.reason)
        reason = f"{error.__class__.__name__}: {error}"
        if raw.read_ct >= self.policy.max_attempts:
            return await self._dead(raw, "failed", reason)
        delay = error.seconds if isinstance(error, RetryAfter) else self.policy.delay(raw.read_ct)
        log.info("queue %s message %s failed (%s); retry in %.1fs", self.queue, raw.msg_id, reason, delay)
        await self.client.set_visibility(self.queue, [raw.msg_id], delay)
        return Outcome.RETRY

    def _delivery(self, item: _Pending[M], conn: psycopg.AsyncConnection[TupleRow]) -> Delivery[M]:
        sender = item.key[0] or None
        return Delivery(item.message, item.raw.msg_id, item.raw.read_ct, self.queue, conn, sender)

    # -- settling a batch ------------------------------------------------------------------------

    async def _in_one_transaction(
        self, pending: Sequence[_Pending[M]], batch: _Batch, opened: _Opened | None = None
    ) -> None:
        """Every message of the batch in one transaction. Handlers rarely fail, so the batch first runs
        without savepoints (a round trip each); if one does fail, that pass rolls back whole and the batch
        runs again with a savepoint per message (the failed one is not run again), so the failing message
        alone is rolled back. The handlers before it thus run twice, as any handler may after a rollback:
        delivery is at-least-once."""
        try:
            await self._one_pass(pending, batch, isolate=False, opened=opened)
        except _HandlerFailed as failed:
            for item in pending:
                batch.outcomes.pop(item.raw.msg_id, None)
            await self._one_pass(pending, batch, isolate=True, known_failure=failed)

    async def _one_pass(
        self,
        pending: Sequence[_Pending[M]],
        batch: _Batch,
        *,
        isolate: bool,
        known_failure: _HandlerFailed | None = None,
        opened: _Opened | None = None,
    ) -> None:
        committed: list[AfterCommit] = []
        if opened is None:
            opened = await _Opened.begin(self.store)
        async with opened.scope:
            conn = opened.conn
            fresh = await self.store.claim(conn, self.model.queue, [item.key for item in pending])
            first = True
            for item in pending:
                if item.key not in fresh:
                    batch.outcomes[item.raw.msg_id] = Outcome.DUPLICATE  # handled before, or earlier in this batch
                    continue
                fresh.discard(item.key)
                if known_failure is not None and item.raw.msg_id == known_failure.msg_id:
                    await self.store.unclaim(conn, self.model.queue, item.key)
                    batch.outcomes[item.raw.msg_id] = await self._failed(item.raw, known_failure.error)
                    continue
                if isolate:
                    await self.store.mark(conn, first)
                    first = False
                delivery = self._delivery(item, conn)
                try:
                    await self.handler(delivery)
                    _raise_if_aborted(conn)
                except Exception as error:
                    if _infrastructure(error, conn):
                        raise  # the whole batch goes back
                    if not isolate:
                        raise _HandlerFailed(item.raw.msg_id, error) from error
                    await self.store.undo(conn)
                    await self.store.unclaim(conn, self.model.queue, item.key)
                    batch.outcomes[item.raw.msg_id] = await self._failed(item.raw, error)
                    continue
                committed += delivery._after_commit
                batch.outcomes[item.raw.msg_id] = Outcome.HANDLED
        batch.callbacks += committed

    async def _in_own_transaction(self, item: _Pending[M], batch: _Batch) -> None:
        """One message in a transaction of its own (concurrent handlers)."""
        conn: psycopg.AsyncConnection[TupleRow] | None = None
        try:
            async with self.store.pool.connection() as conn, conn.transaction():
                if not await self.store.claim(conn, self.model.queue, [item.key]):
                    batch.outcomes[item.raw.msg_id] = Outcome.DUPLICATE
                    return
                delivery = self._delivery(item, conn)
                await self.handler(delivery)
                _raise_if_aborted(conn)
        except Exception as error:
            if conn is None or _infrastructure(error, conn):
                raise
            batch.outcomes[item.raw.msg_id] = await self._failed(item.raw, error)
            return
        batch.outcomes[item.raw.msg_id] = Outcome.HANDLED
        await _run_callbacks(self.queue, delivery._after_commit)

    async def _settle(self, raws: list[RawMessage], batch: _Batch, opened: _Opened | None) -> None:
        pending: list[_Pending[M]] = []
        for raw in raws:
            checked = await self._check(raw)
            if isinstance(checked, Outcome):
                batch.outcomes[raw.msg_id] = checked
            else:
                pending.append(checked)
        if self.concurrency == 1:
            await self._in_one_transaction(pending, batch, opened)
            await _run_callbacks(self.queue, batch.callbacks)
            return
        slots = asyncio.Semaphore(self.concurrency)

        async def bounded(item: _Pending[M]) -> None:
            async with slots:
                await self._in_own_transaction(item, batch)

        results = await asyncio.gather(*(bounded(item) for item in pending), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            raise failures[0]

    # -- batches and the loop --------------------------------------------------------------------

    async def run_once(self, *, begin_early: bool = False) -> int:
        """Read one batch and settle every message in it; returns how many were read. `begin_early` (a read
        that should find messages: woken by a notification, or after a full batch) begins the batch's
        transaction in the service's database beside the read, so its BEGIN costs no round trip of its own
        between the read and the claims; a read that finds nothing then ends that empty transaction."""
        opening = _Opened.beside(self.store) if begin_early and self.concurrency == 1 else None
        try:
            raws = await self.client.read(self.queue, visibility_timeout=self.visibility_timeout, limit=self.batch_size)
        except BaseException:
            await _Opened.discard(opening)
            raise
        opened = await _Opened.taken(opening)
        if not raws:
            if opened is not None:
                await opened.close()
            return 0
        started = time.perf_counter()
        batch = _Batch()
        try:
            await self._settle(raws, batch, opened)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(raws, batch))
            raise
        except (Unavailable, psycopg.OperationalError) as error:
            # Infrastructure failed (e.g. the service database restarted): what did not settle goes back now.
            await self._release(raws, batch)
            raise Unavailable(f"queue {self.queue}: {error}") from error
        except Exception:
            await self._release(raws, batch)  # a fault of ours, not the messages': they go back, uncharged
            raise
        finally:
            if opened is not None:  # ended by the first pass, unless a check failed before it began
                await asyncio.shield(opened.close())
            self._record(batch)
        handled = [i for i, outcome in batch.outcomes.items() if outcome in (Outcome.HANDLED, Outcome.DUPLICATE)]
        await self.client.archive(self.queue, handled)
        self._batch_seconds.observe(time.perf_counter() - started)
        return len(raws)

    def _committed(self) -> frozenset[Outcome]:
        """Outcomes whose claim is already committed when a batch is cut short: with concurrency 1 none (the
        batch is one transaction); with more, each handled message committed in its own."""
        if self.concurrency == 1:
            return frozenset({Outcome.DEAD, Outcome.RETRY})
        return frozenset(Outcome)

    def _record(self, batch: _Batch) -> None:
        for outcome, count in collections.Counter(batch.outcomes.values()).items():
            self._settled[outcome].inc(count)

    async def _release(self, raws: list[RawMessage], batch: _Batch) -> None:
        """Make what did not settle visible again at once instead of after the timeout, and give back the
        read it cost: trouble that was not the message's (a database away, a shutdown) never uses up its
        attempts. A batch that did not commit has settled only its dead letters and retries: its handled
        messages go back too. Messages handled in transactions of their own (concurrency > 1) committed:
        they are archived, as a finished batch's are."""
        kept = self._committed()
        batch.outcomes = {i: o for i, o in batch.outcomes.items() if o in kept}
        unsettled = [r.msg_id for r in raws if r.msg_id not in batch.outcomes]
        done = [i for i, o in batch.outcomes.items() if o in (Outcome.HANDLED, Outcome.DUPLICATE)]
        try:
            await self.client.archive(self.queue, done)
            await self.client.give_back(self.queue, unsettled)
            log.info("queue %s released %d in-flight messages", self.queue, len(unsettled))
        except (Unavailable, psycopg.Error) as error:
            log.warning("could not release in-flight messages (%s); they return after their timeout", error)

    async def _wait_for_work(self, stop: asyncio.Event, timeout: float) -> None:
        waiters = [asyncio.ensure_future(self.wakeup.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self.wakeup.is_set():
            self._woken_at = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in hand is finished first. Cancelling releases it."""
        delay = 0.1
        full = False
        while not stop.is_set():
            woken = self.wakeup.is_set()
            self.wakeup.clear()
            read_started = time.monotonic()
            try:
                read = await self.run_once(begin_early=woken or full)
                delay = 0.1
            except Unavailable as error:
                log.warning("queue %s: database unavailable (%s); retrying", self.queue, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except Exception:
                # Never let one bad batch stop consuming for good: log it, back off, read again.
                log.exception("queue %s: a batch failed; retrying", self.queue)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            full = read >= self.batch_size
            if full:
                continue
            # Inserts within the notify throttle after a notification send none of their own: make
            # sure one read starts after that window closes (or at once, on a new notification, which
            # opens a window of its own); anything later notifies again.
            window_closes = self._woken_at + self.notify_throttle
            if read_started < window_closes:
                await self._wait_for_work(stop, max(window_closes - time.monotonic(), 0) + 0.002)
                continue
            await self._wait_for_work(stop, self.poll_interval)


class _Opened:
    """A connection of the store's pool with the batch's transaction begun on it (BEGIN sent and answered).
    `scope` ends both: the transaction commits, or rolls back on an exception, and the connection goes back
    to the pool; once ended, ending it again does nothing."""

    def __init__(self, conn: psycopg.AsyncConnection[TupleRow], scope: contextlib.AsyncExitStack) -> None:
        self.conn = conn
        self.scope = scope

    @classmethod
    async def begin(cls, store: IdempotencyStore) -> _Opened:
        scope = contextlib.AsyncExitStack()
        try:
            conn = await scope.enter_async_context(store.pool.connection())
            await scope.enter_async_context(conn.transaction())
        except BaseException:
            await asyncio.shield(scope.aclose())
            raise
        return cls(conn, scope)

    @classmethod
    def beside(cls, store: IdempotencyStore) -> asyncio.Task[_Opened]:
        """Begin one in a task of its own, to run beside the read."""
        return asyncio.ensure_future(cls.begin(store))

    @staticmethod
    async def taken(opening: asyncio.Task[_Opened] | None) -> _Opened | None:
        """The transaction begun beside the read, or None when there is none or it could not begin: the
        batch then begins its own, which meets the same trouble and reports it where it always did."""
        if opening is None:
            return None
        try:
            return await opening
        except Exception:
            return None

    @staticmethod
    async def discard(opening: asyncio.Task[_Opened] | None) -> None:
        """Stop beginning, or end, a transaction begun beside a read that failed or was cancelled."""
        if opening is None:
            return
        opening.cancel()  # begin() hands its connection back itself when cut short
        await asyncio.shield(asyncio.wait([opening]))
        if not opening.cancelled() and opening.exception() is None:
            await asyncio.shield(opening.result().close())

    async def close(self) -> None:
        """End the transaction (empty, when no pass used it) and give the connection back."""
        await self.scope.aclose()


def _sender_role(raw: RawMessage) -> object:
    """The login role the provisioner's trigger recorded as a message's sender (for the dead letter's reason)."""
    headers = raw.headers
    return headers.get("sender_role") if isinstance(headers, dict) else None


async def _run_callbacks(queue: str, callbacks: Sequence[AfterCommit]) -> None:
    """After-commit callbacks, in order; one that fails is logged and never undoes the message."""
    for callback in callbacks:
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("queue %s: an after-commit callback failed", queue)


def _infrastructure(error: BaseException, conn: psycopg.AsyncConnection[TupleRow]) -> bool:
    """Trouble with the database itself, not the message: the connection is gone. A statement that failed
    on a live connection (a timeout, a deadlock, a constraint) is the message's failure."""
    return isinstance(error, Unavailable) or (isinstance(error, psycopg.OperationalError) and conn.broken)


def _raise_if_aborted(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    """A handler that swallowed a database error left the transaction aborted: COMMIT would silently roll
    back the claim and every effect of the batch. That is the handler's failure."""
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        raise HandlerLeftTransactionAborted("the handler swallowed a database error; its transaction was aborted")


class HandlerLeftTransactionAborted(Exception):
    """The handler returned, but a statement of its failed and the transaction cannot commit."""
