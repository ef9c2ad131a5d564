"""Connection pools that outlive a PostgreSQL restart.

Connections are not pinged before use (that would double the round trips of a single publish):
a connection broken by a restart fails its next statement, the pool discards it when it comes
back in a bad state, and the caller retries (SharedQueue) or hands the batch back (Consumer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool


@dataclass
class _WaitLimit:
    seconds: float
    active: bool = True


_wait_limit: ContextVar[_WaitLimit | None] = ContextVar("pool_wait_limit", default=None)


@contextlib.contextmanager
def short_waits(seconds: float) -> Iterator[None]:
    """While this context runs (an HTTP request being answered), a caller of these pools that names no
    timeout waits at most `seconds` for a connection, then gets `PoolTimeout` (an OperationalError), instead
    of the pool's 30 s: a request never hangs on a database that is down. A task started inside keeps the
    limit only until the context ends."""
    limit = _WaitLimit(seconds)
    token = _wait_limit.set(limit)
    try:
        yield
    finally:
        limit.active = False
        _wait_limit.reset(token)


class _Pool(AsyncConnectionPool[Any]):
    async def getconn(self, timeout: float | None = None) -> Any:
        limit = _wait_limit.get()
        if timeout is None and limit is not None and limit.active:
            timeout = limit.seconds
        return await super().getconn(timeout)


def connection_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, name: str | None = None, autocommit: bool = False
) -> AsyncConnectionPool:
    """An unopened pool (call `await pool.open()`)."""
    return _Pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": autocommit},
        open=False,
        name=name,
    )
