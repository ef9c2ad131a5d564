"""Analytics over time: the archives' LLM requests and approval decisions in time buckets.

Times are epoch milliseconds (what the console's charts plot, in the viewer's local time). The bucket
width is chosen from the span of the archives, so a day of data and three months both give at most
MAX_BUCKETS points per series.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

MAX_BUCKETS = 240
BUCKET_WIDTHS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
RESPONSE_TIMES_SHOWN = 500

EPOCH_MS = "(extract(epoch FROM {}) * 1000)::bigint"


def bucket(expression: str) -> sql.Composable:
    """`expression` (a timestamptz) as the start of its bucket, in epoch ms; the width is %(width)s."""
    binned = f"date_bin(make_interval(secs => %(width)s::float8), {expression}, timestamptz '2000-01-01')"
    return sql.SQL(EPOCH_MS.format(binned))


async def _rows(conn: AsyncConnection, query: sql.Composed, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def bucket_seconds(conn: AsyncConnection) -> int:
    """The narrowest width that puts the archived requests' whole span in MAX_BUCKETS buckets."""
    cur = await conn.execute(
        """
        SELECT extract(epoch FROM max(t) - min(t))::float FROM (
            SELECT (message->>'created_at')::timestamptz AS t FROM pgmq.a_llm_requests
            UNION ALL SELECT (message->>'created_at')::timestamptz FROM pgmq.a_approval_requests
        ) requests
        """
    )
    row = await cur.fetchone()
    span = float(row[0]) if row and row[0] is not None else 0.0
    return next((w for w in BUCKET_WIDTHS if span / w <= MAX_BUCKETS), BUCKET_WIDTHS[-1])


async def llm_over_time(conn: AsyncConnection, llm_results: sql.Composable, width: int) -> list[dict[str, Any]]:
    """LLM requests and their cost per bucket (by when they were asked), model and task type."""
    query = sql.SQL(
        """
        SELECT {t} AS t,
               coalesce(r.message->>'model', 'no reply') AS model,
               q.message->>'task_type' AS task_type,
               count(*) AS requests,
               round(coalesce(sum((r.message->>'cost_usd')::numeric), 0), 8)::float AS cost_usd
        FROM pgmq.a_llm_requests q
        LEFT JOIN {replies} r ON r.message->>'request_id' = q.message->>'request_id'
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        """
    ).format(t=bucket("(q.message->>'created_at')::timestamptz"), replies=llm_results)
    return await _rows(conn, query, {"width": width})


async def approval_decisions(conn: AsyncConnection, responses: sql.Composable, width: int) -> list[dict[str, Any]]:
    """Approvals and rejections per bucket, by when the human decided."""
    query = sql.SQL(
        """
        SELECT {t} AS t,
               count(*) FILTER (WHERE (r.message->>'approved')::boolean) AS approved,
               count(*) FILTER (WHERE NOT (r.message->>'approved')::boolean) AS rejected
        FROM {replies} r
        GROUP BY 1 ORDER BY 1
        """
    ).format(t=bucket("(r.message->>'created_at')::timestamptz"), replies=responses)
    return await _rows(conn, query, {"width": width})


async def response_times(conn: AsyncConnection, responses: sql.Composable) -> list[dict[str, Any]]:
    """The newest decisions: when, how long the human took (request created → response created), the verdict."""
    query = sql.SQL(
        """
        SELECT {t} AS t,
               extract(epoch FROM (r.message->>'created_at')::timestamptz
                                  - (q.message->>'created_at')::timestamptz)::float AS seconds,
               (r.message->>'approved')::boolean AS approved
        FROM pgmq.a_approval_requests q
        JOIN {replies} r ON r.message->>'request_id' = q.message->>'request_id'
        ORDER BY 1 DESC LIMIT %(limit)s
        """
    ).format(t=sql.SQL(EPOCH_MS.format("(r.message->>'created_at')::timestamptz")), replies=responses)
    return list(reversed(await _rows(conn, query, {"limit": RESPONSE_TIMES_SHOWN})))
