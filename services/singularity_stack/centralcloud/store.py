"""CentralCloud's own database: every prune run, the newest analytics reports, and queue samples."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from singularity_stack.sharedqueue.client import QueueMetrics
from singularity_stack.topology import DLQ_SUFFIX

# Only the newest report is served; a few older ones are kept to look back at, not one a minute forever.
REPORTS_KEPT = 100
# Points per queue a chart gets, however long the retention: samples are binned to fit.
MAX_QUEUE_POINTS = 240


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
            await conn.execute(
                "DELETE FROM analytics_reports WHERE id <= (SELECT max(id) FROM analytics_reports) - %s",
                (REPORTS_KEPT,),
            )

    async def latest_report(self) -> tuple[dict[str, Any] | None, str | None]:
        """The newest report and when it was computed (ISO 8601), or (None, None) before the first."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT report, computed_at FROM analytics_reports ORDER BY id DESC LIMIT 1")
            row = await cur.fetchone()
        return (row[0], row[1].isoformat()) if row else (None, None)

    async def record_queue_samples(self, metrics: list[QueueMetrics], retention_hours: float) -> None:
        """One sample per queue, stamped with one time; samples older than the retention go."""
        async with self.pool.connection() as conn, conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO queue_samples (sampled_at, queue, length, visible, oldest_age_seconds, total_messages)"
                    " VALUES (now(), %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [(m.queue, m.length, m.visible, m.oldest_age_seconds, m.total_messages) for m in metrics],
                )
            await conn.execute(
                "DELETE FROM queue_samples WHERE sampled_at < now() - make_interval(secs => %s::float8)",
                (retention_hours * 3600,),
            )

    async def queue_series(self) -> dict[str, Any]:
        """Depth and oldest-message age over time of every work queue that held a message in the window,
        binned to at most MAX_QUEUE_POINTS points (the biggest value of each bin); times in epoch ms."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                WITH span AS (
                    SELECT greatest(ceil(extract(epoch FROM max(sampled_at) - min(sampled_at)) / %(points)s), 1)
                           AS width
                    FROM queue_samples
                ), busy AS (
                    SELECT queue FROM queue_samples
                    WHERE right(queue, %(suffix_len)s) <> %(suffix)s GROUP BY queue HAVING max(length) > 0
                )
                SELECT s.queue,
                       (extract(epoch FROM date_bin(make_interval(secs => span.width), s.sampled_at,
                                                    timestamptz '2000-01-01')) * 1000)::bigint AS t,
                       max(s.length), max(s.oldest_age_seconds), span.width
                FROM queue_samples s CROSS JOIN span
                WHERE s.queue IN (SELECT queue FROM busy)
                GROUP BY s.queue, t, span.width ORDER BY s.queue, t
                """,
                {"points": MAX_QUEUE_POINTS, "suffix": DLQ_SUFFIX, "suffix_len": len(DLQ_SUFFIX)},
            )
            rows = await cur.fetchall()
            count = await conn.execute("SELECT count(DISTINCT sampled_at), max(sampled_at) FROM queue_samples")
            samples, newest = await count.fetchone() or (0, None)
        series: dict[str, list[dict[str, Any]]] = {}
        for queue, t, length, oldest, _ in rows:
            series.setdefault(queue, []).append({"t": t, "length": length, "oldest_age_seconds": oldest})
        return {
            "bin_seconds": int(rows[0][4]) if rows else None,
            "observations": samples,
            "newest_sample_at": newest.isoformat() if newest else None,
            "series": [{"queue": q, "points": points} for q, points in series.items()],
        }

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Each dead-letter queue at the newest sample: its source queue, messages in it now, ever sent to it."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT queue, length, total_messages FROM queue_samples
                WHERE sampled_at = (SELECT max(sampled_at) FROM queue_samples)
                  AND right(queue, %(suffix_len)s) = %(suffix)s AND total_messages > 0
                ORDER BY length DESC, queue
                """,
                {"suffix": DLQ_SUFFIX, "suffix_len": len(DLQ_SUFFIX)},
            )
            rows = await cur.fetchall()
        return [
            {"queue": q[: -len(DLQ_SUFFIX)], "dead_letter_queue": q, "waiting": length, "ever": total}
            for q, length, total in rows
        ]
