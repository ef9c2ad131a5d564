"""Test helpers shared by several test modules."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool

from singularity_stack.provision.provisioner import ProvisionResult
from singularity_stack.sharedqueue import IdempotencyStore, SharedQueue
from singularity_stack.sharedqueue.pool import connection_pool

# Debian's Chromium, driven by Playwright (no browser download here); flags that keep it off the network.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class Stack:
    """Opens clients and pools as a stack's roles; closes them all at the end of the test."""

    def __init__(self, result: ProvisionResult) -> None:
        self.result = result
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def url(self, logical: str) -> str:
        return self.result.credentials[logical].shared_queue_url

    def db_url(self, logical: str) -> str:
        return self.result.credentials[logical].database_url

    @property
    def owner_url(self) -> str:
        return self.url("centralcloud")

    async def queue(self, logical: str, **options: object) -> SharedQueue:
        client = SharedQueue(self.url(logical), **options)  # type: ignore[arg-type]
        await client.open()
        self._closers.append(client.close)
        return client

    async def db_pool(self, logical: str, max_size: int = 10) -> AsyncConnectionPool:
        pool = connection_pool(self.db_url(logical), max_size=max_size)
        await pool.open(wait=True)
        self._closers.append(pool.close)
        return pool

    async def store(self, logical: str, max_size: int = 10) -> IdempotencyStore:
        """The idempotency store every consumer needs, on `logical`'s own database."""
        return IdempotencyStore(await self.db_pool(logical, max_size))

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()

    def owner_query(self, query: str, params: tuple = ()) -> list[tuple]:
        """Read shared_queue as its owner (CentralCloud): queue and archive contents for assertions."""
        with psycopg.connect(self.owner_url) as conn:
            return conn.execute(query, params).fetchall()


def send_raw(stack: Stack, logical: str, queue: str, body: object) -> int:
    """Send any JSON value as `logical`'s role, past the client's validation: what a buggy or hostile sender does."""
    with psycopg.connect(stack.url(logical), autocommit=True) as conn:
        row = conn.execute("SELECT * FROM pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body))).fetchone()
    assert row is not None
    return int(row[0])


def settled(queue: str, outcome: str) -> float:
    """How many messages of `queue` consumers in this process settled as `outcome` (their Prometheus counter)."""
    value = REGISTRY.get_sample_value("singularity_queue_messages_total", {"queue": queue, "outcome": outcome})
    return value or 0.0
