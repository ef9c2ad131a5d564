"""Consuming a queue: read with a visibility timeout, handle, archive; retry with back-off; dead-letter.

Every message ends in exactly one of three places: the archive (handled, or a duplicate of a
handled one), back in the queue with a later visibility time (failed, attempts left), or the
dead-letter queue with the reason (invalid, forged sender, expired, failed too often).

A request is handled only when PostgreSQL vouches for its sender (the `sender` header the
provisioner's trigger writes) and that sender is the instance its `reply_to` names.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import psycopg
from psycopg.rows import TupleRow
from pydantic import ValidationError

from singularity_stack.contract import Message, Request, describe_validation_error
from singularity_stack.sharedqueue.client import RawMessage, SharedQueue
from singularity_stack.sharedqueue.idempotency import IdempotencyStore
from singularity_stack.sharedqueue.metrics import BATCH_SECONDS, MESSAGES
from singularity_stack.topology import NOTIFY_THROTTLE_MS

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with jitter; after `max_attempts` failed reads the message is dead-lettered."""

    max_attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 300.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(attempt - 1, 0))
        return ceiling * (0.5 + random.random() / 2)


@dataclass(frozen=True, slots=True)
class Delivery(Generic[M]):
    """What a handler gets: the parsed message, its attempt number and, with an idempotency
    store, `db`: the open transaction in the service's database that also records the message.
    For a request, `sender` is the instance PostgreSQL vouches sent it (always its `reply_to`):
    replies go to its queues."""

    message: M
    msg_id: int
    attempt: int
    queue: str
    db: psycopg.AsyncConnection[TupleRow] | None = None
    sender: str | None = None


Handler = Callable[[Delivery[M]], Awaitable[None]]


class Outcome(enum.Enum):
    HANDLED = "handled"
    DUPLICATE = "duplicate"
    RETRY = "retry"
    DEAD = "dead"


@dataclass
class ConsumerStats:
    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))

    def add(self, outcome: Outcome, count: int = 1) -> None:
        self.counts[outcome] += count


class Consumer(Generic[M]):
    def __init__(
        self,
        client: SharedQueue,
        queue: str,
        model: type[M],
        handler: Handler[M],
        *,
        policy: RetryPolicy | None = None,
        batch_size: int = 10,
        concurrency: int = 1,
        visibility_timeout: int = 30,
        poll_interval: float = 1.0,
        idempotency: IdempotencyStore | None = None,
        wakeup: asyncio.Event | None = None,
        notify_throttle: float = NOTIFY_THROTTLE_MS / 1000,
    ) -> None:
        self.client = client
        self.queue = queue
        self.model = model
        self.handler = handler
        self.policy = policy or RetryPolicy()
        self.batch_size = batch_size
        # Messages of a batch handled at once: 1 (in order) suits quick handlers; slow ones
        # (LLM calls, code jobs) set it to the number of calls they may have in flight.
        self.concurrency = concurrency
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.idempotency = idempotency
        self.wakeup = wakeup or asyncio.Event()
        self.notify_throttle = notify_throttle
        self._woken_at = float("-inf")
        self._stamps_sender = False  # learnt from the queue's table on the first request read
        self.stats = ConsumerStats()
        # Prometheus children looked up once: labels() per message costs more than the rest of the metric.
        self._settled = {outcome: MESSAGES.labels(queue, outcome.value) for outcome in Outcome}
        self._batch_seconds = BATCH_SECONDS.labels(queue)

    # -- one message -----------------------------------------------------------------------------

    async def _dead(self, raw: RawMessage, reason: str, error: str) -> Outcome:
        log.warning("queue %s message %s dead-lettered (%s): %s", self.queue, raw.msg_id, reason, error)
        await self.client.dead_letter(self.queue, raw, reason, error)
        return Outcome.DEAD

    async def _forged(self, message: Request, raw: RawMessage) -> str | None:
        """Why `message` cannot be answered as its `reply_to` (None: PostgreSQL vouches it is theirs)."""
        if not self._stamps_sender:
            self._stamps_sender = await self.client.stamps_sender(self.queue)
        if not self._stamps_sender:
            return f"queue {self.queue} does not record senders (provision the stack again): no sender is vouched"
        headers = raw.headers if isinstance(raw.headers, dict) else {}
        sender = headers.get("sender")
        if not isinstance(sender, str):
            role = headers.get("sender_role")
            return f"no sender vouched by PostgreSQL (role {role!r}, or sent before senders were recorded)"
        if sender != message.reply_to:
            return f"reply_to {message.reply_to} but sent by {sender} (role {headers.get('sender_role')})"
        return None

    async def _invoke(self, message: M, raw: RawMessage, sender: str | None) -> Outcome:
        if self.idempotency is None:
            await self.handler(Delivery(message, raw.msg_id, raw.read_ct, self.queue, sender=sender))
            return Outcome.HANDLED
        async with self.idempotency.claim(self.model.queue, message.request_id, sender or "") as claim:
            if not claim.fresh:
                return Outcome.DUPLICATE
            await self.handler(Delivery(message, raw.msg_id, raw.read_ct, self.queue, claim.db, sender))
            return Outcome.HANDLED

    async def _settle_all(self, batch: list[RawMessage]) -> list[Outcome | BaseException]:
        """Settle every message; an infrastructure failure is returned, not raised, so the rest still settle."""
        if self.concurrency == 1:
            results: list[Outcome | BaseException] = []
            for raw in batch:
                try:
                    results.append(await self._process(raw))
                except Exception as error:
                    results.append(error)
            return results
        slots = asyncio.Semaphore(self.concurrency)

        async def bounded(raw: RawMessage) -> Outcome:
            async with slots:
                return await self._process(raw)

        return await asyncio.gather(*(bounded(raw) for raw in batch), return_exceptions=True)

    async def _process(self, raw: RawMessage) -> Outcome:
        if raw.read_ct > self.policy.max_attempts:
            # Read more often than allowed without a verdict: earlier consumers died on it.
            return await self._dead(raw, "attempts_exhausted", f"read {raw.read_ct} times without completing")
        try:
            message = self.model.model_validate_json(raw.body)
        except ValidationError as error:
            return await self._dead(raw, "invalid", describe_validation_error(error))
        sender: str | None = None
        if isinstance(message, Request):
            forged = await self._forged(message, raw)
            if forged is not None:
                return await self._dead(raw, "forged_sender", forged)
            sender = message.reply_to
        if message.expired():
            return await self._dead(raw, "expired", f"deadline {message.deadline.isoformat()} passed")  # type: ignore[union-attr]
        try:
            return await self._invoke(message, raw, sender)
        except psycopg.OperationalError:
            raise  # infrastructure, not the message: the batch is abandoned and redelivered
        except Exception as error:  # any handler failure is retried, then dead-lettered
            reason = f"{error.__class__.__name__}: {error}"
            if raw.read_ct >= self.policy.max_attempts:
                return await self._dead(raw, "failed", reason)
            delay = self.policy.delay(raw.read_ct)
            log.info("queue %s message %s failed (%s); retry in %.1fs", self.queue, raw.msg_id, reason, delay)
            await self.client.set_visibility(self.queue, [raw.msg_id], delay)
            return Outcome.RETRY

    # -- batches and the loop --------------------------------------------------------------------

    async def run_once(self) -> int:
        """Read one batch and settle every message in it; returns how many were read."""
        batch = await self.client.read(self.queue, visibility_timeout=self.visibility_timeout, limit=self.batch_size)
        if not batch:
            return 0
        started = time.perf_counter()
        try:
            results = await self._settle_all(batch)
        except asyncio.CancelledError:
            await asyncio.shield(self._release([raw.msg_id for raw in batch]))
            raise
        settled = {
            raw.msg_id: result for raw, result in zip(batch, results, strict=True) if isinstance(result, Outcome)
        }
        await self.client.archive(
            self.queue, [i for i, outcome in settled.items() if outcome in (Outcome.HANDLED, Outcome.DUPLICATE)]
        )
        self._batch_seconds.observe(time.perf_counter() - started)
        for outcome, count in collections.Counter(settled.values()).items():
            self.stats.add(outcome, count)
            self._settled[outcome].inc(count)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            # Infrastructure failed (e.g. the service database restarted): hand the rest back now.
            await self._release([raw.msg_id for raw in batch if raw.msg_id not in settled])
            raise failures[0]
        return len(batch)

    async def _release(self, msg_ids: list[int]) -> None:
        """On cancellation, make unfinished messages visible again at once instead of after the timeout.
        Messages already settled are no longer in the queue, so this touches only the unfinished ones."""
        try:
            await self.client.set_visibility(self.queue, msg_ids, 0)
            log.info("queue %s released %d in-flight messages", self.queue, len(msg_ids))
        except psycopg.Error as error:
            log.warning("could not release in-flight messages (%s); they return after their timeout", error)

    async def _wait_for_work(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self.wakeup.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self.wakeup.is_set():
            self._woken_at = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in hand is finished first. Cancelling releases it."""
        delay = 0.1
        while not stop.is_set():
            self.wakeup.clear()
            read_started = time.monotonic()
            try:
                read = await self.run_once()
                delay = 0.1
            except psycopg.OperationalError as error:
                log.warning("queue %s: database unavailable (%s); retrying", self.queue, error.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if read >= self.batch_size:
                continue
            # Inserts within the notify throttle after a notification send none of their own: make
            # sure one read starts after that window closes; anything later notifies again.
            window_closes = self._woken_at + self.notify_throttle
            if read_started < window_closes:
                await asyncio.sleep(max(window_closes - time.monotonic(), 0) + 0.002)
                continue
            await self._wait_for_work(stop)
