"""A service's NATS side in the migration from NATS, by MESSAGING_MODE (service/settings.py):

- `pgmq` (the default): nothing; no connection to nats-server.
- `dual` (phase 1): beside each of the service's pgmq consumers of a work queue, a NatsReader of that
  queue's stream with the same handler, so Nexus and Genesis serve requests from both paths (deduplicated
  across them by the claim) and an instance reads its replies from both.
- `cutover` (phase 2): the request readers stop; a NATS request is refused aloud (nats_cutover.py). An
  instance still drains its NATS reply streams: a human may decide a request held in dual after the
  cutover, and its answer goes back the way the request came.

Replies go out through `replies` (a ReplyRouter): on the path their request came by. The connection is
made in the background, retried until nats-server answers: the pgmq path never waits for NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client

from singularity_stack.service.settings import ServiceSettings
from singularity_stack.sharedqueue import Consumer, SharedQueue
from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.sharedqueue.nats_connection import connect
from singularity_stack.sharedqueue.nats_cutover import refuser
from singularity_stack.sharedqueue.nats_reader import NatsReader
from singularity_stack.sharedqueue.nats_replies import NatsReplies, ReplyRouter
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)


class Messaging:
    def __init__(self, settings: ServiceSettings, queue: SharedQueue, user: str) -> None:
        self.mode = settings.messaging_mode
        self.settings = settings
        self.user = user  # the service's (or instance's) NATS user, by logical name
        self.layout = StackLayout(settings.singularity_instances, settings.stack_prefix)
        self.queue = queue
        self.replies = ReplyRouter(queue, None)
        self.nc: Client | None = None
        self.connected = asyncio.Event()
        self.readers: list[NatsReader[Any]] = []
        # Run once connected, before any reader, until each succeeds (CentralCloud creates the streams).
        self.on_connect: list[Callable[[Client], Awaitable[None]]] = []

    @property
    def enabled(self) -> bool:
        return self.mode != "pgmq"

    async def connect(self, stop: asyncio.Event) -> Client | None:
        """Connect as the service's NATS user, retrying until nats-server answers; None if stopped first."""
        delay = 0.25
        while not stop.is_set():
            try:
                self.nc = await connect(
                    self.settings.nats_url,
                    self.layout,
                    self.user,
                    self.settings.nats_password,
                    connect_timeout=2,
                    allow_reconnect=True,
                )
            except Exception as error:  # nats-py raises several kinds while the server is away
                log.warning(
                    "NATS %s not reachable (%s: %s); retrying", self.settings.nats_url, type(error).__name__, error
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            self.replies.nats = NatsReplies(self.nc.jetstream(), self.layout, self.queue)
            self.connected.set()
            log.info("NATS connected", extra={"messaging_mode": self.mode, "nats_user": self.user})
            return self.nc
        return None

    def readers_for(self, nc: Client, consumers: list[Consumer[Any]]) -> list[NatsReader[Any]]:
        """The NATS readers the mode asks for, beside `consumers` (only work queues have a stream)."""
        readers: list[NatsReader[Any]] = []
        for consumer in consumers:
            work = subjects.work_queue(self.layout, consumer.queue)
            if work is None:
                continue
            # An instance's replies are read in dual and drained in cutover; requests are refused in cutover.
            handler = consumer.handler if work.instance or self.mode == "dual" else refuser(self.replies)
            readers.append(
                NatsReader(
                    nc,
                    self.layout,
                    work.reader,
                    consumer.queue,
                    consumer.model,
                    handler,
                    client=consumer.client,
                    store=consumer.store,
                    policy=consumer.policy,
                    batch_size=consumer.batch_size,
                    concurrency=consumer.concurrency,
                )
            )
        return readers

    async def run(self, stop: asyncio.Event, consumers: list[Consumer[Any]]) -> None:
        """Connect, then read every reader's stream until `stop` (each finishes the batch in hand)."""
        nc = await self.connect(stop)
        if nc is None:
            return
        for hook in self.on_connect:
            await self._until_done(stop, hook, nc)
        self.readers = self.readers_for(nc, consumers)
        await asyncio.gather(*(reader.run(stop) for reader in self.readers))
        await stop.wait()  # a service without readers (CentralCloud) keeps its connection until the end

    @staticmethod
    async def _until_done(stop: asyncio.Event, hook: Callable[[Client], Awaitable[None]], nc: Client) -> None:
        delay = 0.25
        while not stop.is_set():
            try:
                await hook(nc)
                return
            except Exception:
                log.exception("NATS %s failed; retrying", getattr(hook, "__name__", "on-connect"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        """After the readers stopped. Every publish was acknowledged already: nothing to drain, and a
        nats-server that is away must not hold up the stop."""
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except Exception as error:
                log.info("NATS close: %s", error)

    def details(self) -> dict[str, str]:
        """What /readyz shows of the mode (nothing in pgmq mode)."""
        if not self.enabled:
            return {}
        state = "connected" if self.nc is not None and self.nc.is_connected else "not connected"
        return {"messaging_mode": self.mode, "nats": state}
