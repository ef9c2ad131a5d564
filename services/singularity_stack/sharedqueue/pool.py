"""Connection pools that outlive a PostgreSQL restart: every connection is checked before use."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool


def connection_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, name: str | None = None, autocommit: bool = False
) -> AsyncConnectionPool:
    """An unopened pool (call `await pool.open()`); broken connections are replaced, not handed out."""
    return AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": autocommit},
        check=AsyncConnectionPool.check_connection,
        open=False,
        name=name,
    )
