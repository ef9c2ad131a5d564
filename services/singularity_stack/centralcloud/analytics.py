"""Analytics over the shared_queue archives, read through CentralCloud's read-only role.

Requests and their replies are joined on request_id: replies live in each instance's own
reply queue, so their archives are read together (`a_llm_results_singularity_1`, `_2`, ...).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row


def _archives_of(conn: psycopg.Connection, kind: str) -> sql.Composable:
    """A UNION ALL over the archives of every instance's `kind` reply queue (dead-letter queues excluded)."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT queue_name FROM pgmq.meta WHERE queue_name LIKE %s AND queue_name NOT LIKE '%%\\_dlq' "
            "ORDER BY queue_name",
            (f"{kind}\\_singularity\\_%",),
        )
    ]
    if not names:
        return sql.SQL("(SELECT NULL::jsonb AS message WHERE false)")
    parts = [sql.SQL("SELECT message FROM {}").format(sql.Identifier("pgmq", f"a_{name}")) for name in names]
    return sql.SQL("(") + sql.SQL(" UNION ALL ").join(parts) + sql.SQL(")")


def _rows(conn: psycopg.Connection, query: sql.Composed) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query)
        return cur.fetchall()


def llm_usage(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """LLM requests by task type, complexity and model: how many, what they cost."""
    return _rows(
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
        ).format(_archives_of(conn, "llm_results")),
    )


def approvals(conn: psycopg.Connection) -> dict[str, Any]:
    """Approval rate and how long humans took to decide (request creation → response creation)."""
    rows = _rows(
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
        ).format(_archives_of(conn, "approval_responses")),
    )
    report = rows[0]
    report["approval_rate"] = report["approved"] / report["decided"] if report["decided"] else None
    return report


def job_outcomes(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Genesis jobs by language and outcome."""
    return _rows(
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
        ).format(_archives_of(conn, "job_results")),
    )


def report(analytics_url: str) -> dict[str, Any]:
    """The whole report, in one read-only transaction so its parts agree."""
    with psycopg.connect(analytics_url) as conn:
        conn.read_only = True
        return {"llm": llm_usage(conn), "approvals": approvals(conn), "jobs": job_outcomes(conn)}
