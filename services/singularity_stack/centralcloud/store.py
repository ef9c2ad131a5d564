"""CentralCloud's own database: the record of every prune run and of every analytics report."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool


class CentralCloudStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def record_prune_run(self, retention_days: int, pruned: dict[str, int]) -> None:
        """One row for the run, even when it pruned nothing, and one per queue it pruned, in one transaction."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO prune_runs (retention_days, pruned) VALUES (%s, %s) RETURNING id",
                (retention_days, sum(pruned.values())),
            )
            row = await cur.fetchone()
            assert row is not None
            async with conn.cursor() as queues:
                await queues.executemany(
                    "INSERT INTO prune_run_queues (run_id, queue, pruned) VALUES (%s, %s, %s)",
                    [(row[0], queue, count) for queue, count in pruned.items() if count],
                )

    async def prune_runs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest runs first: when, the retention, how many archived messages in all and per queue."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT r.ran_at, r.retention_days, r.pruned,
                       coalesce((SELECT jsonb_object_agg(q.queue, q.pruned ORDER BY q.queue)
                                 FROM prune_run_queues q WHERE q.run_id = r.id), '{}'::jsonb)
                FROM prune_runs r ORDER BY r.id DESC LIMIT %s
                """,
                (limit,),
            )
            rows = await cur.fetchall()
        keys = ("ran_at", "retention_days", "pruned", "by_queue")
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
