"""Analytics over the shared_queue archives, read through CentralCloud's read-only role."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from singularity_stack.centralcloud import archives, timeseries


async def _rows(conn: AsyncConnection, query: sql.Composed) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query)
        return await cur.fetchall()


async def llm_usage(conn: AsyncConnection, llm_results: sql.Composable) -> list[dict[str, Any]]:
    """LLM requests by task type, complexity and model: how many, what they cost."""
    return await _rows(
        conn,
        sql.SQL(
            """
            SELECT q.message->>'task_type' AS task_type,
                   coalesce(r.message->>'complexity', q.message->>'complexity', 'unknown') AS complexity,
                   coalesce(r.message->>'model', 'no reply') AS model,
                   count(*) AS requests,
                   count(*) FILTER (WHERE r.message->>'error' IS NOT NULL) AS errors,
                   round(coalesce(sum((r.message->>'cost_usd')::numeric), 0), 8)::float AS cost_usd
            FROM pgmq.a_llm_requests q
            LEFT JOIN {} r ON r.message->>'request_id' = q.message->>'request_id'
            GROUP BY 1, 2, 3 ORDER BY requests DESC, task_type
            """
        ).format(llm_results),
    )


async def approvals(conn: AsyncConnection, responses: sql.Composable) -> dict[str, Any]:
    """Approval rate and how long humans took to decide (request creation → response creation)."""
    rows = await _rows(
        conn,
        sql.SQL(
            """
            SELECT count(*) AS requests,
                   count(r.message) AS decided,
                   count(*) FILTER (WHERE (r.message->>'approved')::boolean) AS approved,
                   count(*) FILTER (WHERE NOT (r.message->>'approved')::boolean) AS rejected,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM
                       (r.message->>'created_at')::timestamptz - (q.message->>'created_at')::timestamptz))
                       AS median_response_seconds,
                   max(extract(epoch FROM
                       (r.message->>'created_at')::timestamptz - (q.message->>'created_at')::timestamptz))::float
                       AS max_response_seconds
            FROM pgmq.a_approval_requests q
            LEFT JOIN {} r ON r.message->>'request_id' = q.message->>'request_id'
            """
        ).format(responses),
    )
    report = rows[0]
    report["approval_rate"] = report["approved"] / report["decided"] if report["decided"] else None
    return report


async def job_outcomes(conn: AsyncConnection, job_results: sql.Composable) -> list[dict[str, Any]]:
    """Genesis jobs by language and outcome."""
    return await _rows(
        conn,
        sql.SQL(
            """
            SELECT q.message->>'language' AS language,
                   coalesce(r.message->>'status', 'no result') AS status,
                   count(*) AS jobs,
                   round(avg((r.message->'timings_ms'->>'run')::numeric), 1)::float AS avg_run_ms
            FROM pgmq.a_job_requests q
            LEFT JOIN {} r ON r.message->>'request_id' = q.message->>'request_id'
            GROUP BY 1, 2 ORDER BY language, jobs DESC
            """
        ).format(job_results),
    )


async def paths(conn: AsyncConnection) -> dict[str, Any]:
    """Readiness to retire NATS (the migration's phase 3): per queue and path, the messages archived and
    the newest one's time; and the newest NATS message anywhere. NATS messages carry `"path": "nats"` in
    their archive headers (sharedqueue/nats_reader.py, nats_replies.py); every other row came by pgmq."""
    names = await archives.work_queues(conn)
    if not names:
        return {"by_queue": [], "nats_messages": 0, "last_nats_message_at": None}
    parts = [
        sql.SQL(
            "SELECT {}::text AS queue, coalesce(headers->>'path', 'pgmq') AS path, count(*) AS messages, "
            "max(enqueued_at) AS last_message_at FROM {} GROUP BY 2"
        ).format(sql.Literal(name), sql.Identifier("pgmq", f"a_{name}"))
        for name in names
    ]
    rows = await _rows(
        conn, sql.SQL("SELECT * FROM (") + sql.SQL(" UNION ALL ").join(parts) + sql.SQL(") p ORDER BY 1, 2")
    )
    nats = [row for row in rows if row["path"] == "nats"]
    last = max((row["last_message_at"] for row in nats), default=None)
    for row in rows:  # the report is stored as JSON
        row["last_message_at"] = row["last_message_at"].isoformat()
    return {
        "by_queue": rows,
        "nats_messages": sum(row["messages"] for row in nats),
        "last_nats_message_at": last.isoformat() if last else None,
    }


async def fingerprint(pool: AsyncConnectionPool) -> dict[str, str]:
    async with pool.connection() as conn:
        return await archives.fingerprint(conn)


async def report(pool: AsyncConnectionPool) -> dict[str, Any]:
    """The whole report, in one read-only repeatable-read transaction so its parts (and the archives'
    fingerprint it carries, to tell later whether they changed since) agree."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        llm_results = await archives.replies_of(conn, "llm_results")
        responses = await archives.replies_of(conn, "approval_responses")
        job_results = await archives.replies_of(conn, "job_results")
        width = await timeseries.bucket_seconds(conn)
        return {
            "llm": await llm_usage(conn, llm_results),
            "approvals": await approvals(conn, responses),
            "jobs": await job_outcomes(conn, job_results),
            "bucket_seconds": width,
            "llm_over_time": await timeseries.llm_over_time(conn, llm_results, width),
            "approval_decisions": await timeseries.approval_decisions(conn, responses, width),
            "response_times": await timeseries.response_times(conn, responses),
            "paths": await paths(conn),
            "archives": await archives.fingerprint(conn),
        }
