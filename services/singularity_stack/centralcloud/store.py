"""CentralCloud's own database: the record of every prune run and of every analytics report."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool


class CentralCloudStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def record_prune_run(self, retention_days: int, pruned: dict[str, int]) -> None:
        """One row per queue pruned, in one transaction."""
        async with self.pool.connection() as conn, conn.transaction():
            for queue, count in pruned.items():
                await conn.execute(
                    "INSERT INTO prune_runs (retention_days, queue, pruned) VALUES (%s, %s, %s)",
                    (retention_days, queue, count),
                )

    async def prune_runs(self, limit: int = 100) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT ran_at, retention_days, queue, pruned FROM prune_runs ORDER BY id DESC LIMIT %s", (limit,)
            )
            rows = await cur.fetchall()
        keys = ("ran_at", "retention_days", "queue", "pruned")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    async def add_report(self, report: dict[str, Any]) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("INSERT INTO analytics_reports (report) VALUES (%s)", (Jsonb(report),))

    async def latest_report(self) -> tuple[dict[str, Any] | None, str | None]:
        """The newest report and when it was computed (ISO 8601), or (None, None) before the first."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT report, computed_at FROM analytics_reports ORDER BY id DESC LIMIT 1")
            row = await cur.fetchone()
        return (row[0], row[1].isoformat()) if row else (None, None)
