"""Connection pools that outlive a PostgreSQL restart.

Connections are not pinged before use (that would double the round trips of a single publish):
a connection broken by a restart fails its next statement, the pool discards it when it comes
back in a bad state, and the caller retries (SharedQueue) or hands the batch back (Consumer)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool


def connection_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, name: str | None = None, autocommit: bool = False
) -> AsyncConnectionPool:
    """An unopened pool (call `await pool.open()`)."""
    return AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": autocommit},
        open=False,
        name=name,
    )
