"""Which shared_queue archives the analytics read, and a cheap fingerprint that changes when they do.

Requests and their replies are joined on request_id: replies live in each instance's own reply queue,
so their archives are read together (`a_llm_results_singularity_1`, `_2`, ...).
"""

from __future__ import annotations

from psycopg import AsyncConnection, sql

REQUEST_QUEUES = ("llm_requests", "approval_requests", "job_requests")
REPLY_KINDS = ("llm_results", "approval_responses", "job_results")


async def reply_queues(conn: AsyncConnection, kind: str) -> list[str]:
    """Every instance's `kind` reply queue (dead-letter queues excluded)."""
    cur = await conn.execute(
        "SELECT queue_name FROM pgmq.meta WHERE queue_name LIKE %s AND queue_name NOT LIKE '%%\\_dlq' "
        "ORDER BY queue_name",
        (f"{kind}\\_singularity\\_%",),
    )
    return [str(r[0]) for r in await cur.fetchall()]


async def replies_of(conn: AsyncConnection, kind: str) -> sql.Composable:
    """A UNION ALL over the archives of every instance's `kind` reply queue, as one `message` column."""
    names = await reply_queues(conn, kind)
    if not names:
        return sql.SQL("(SELECT NULL::jsonb AS message WHERE false)")
    parts = [sql.SQL("SELECT message FROM {}").format(sql.Identifier("pgmq", f"a_{name}")) for name in names]
    return sql.SQL("(") + sql.SQL(" UNION ALL ").join(parts) + sql.SQL(")")


async def fingerprint(conn: AsyncConnection) -> dict[str, str]:
    """Archive → its newest archived_at and msg_id: two index lookups per archive, so it can run every
    few seconds. A new archived message changes it; a pruned one does not (a prune recomputes anyway)."""
    queues = list(REQUEST_QUEUES)
    for kind in REPLY_KINDS:
        queues += await reply_queues(conn, kind)
    existing = await conn.execute("SELECT queue_name FROM pgmq.meta WHERE queue_name = ANY(%s)", (queues,))
    present = {str(r[0]) for r in await existing.fetchall()}
    parts = [
        sql.SQL("SELECT {}::text, max(archived_at)::text, max(msg_id)::text FROM {}").format(
            sql.Literal(q), sql.Identifier("pgmq", f"a_{q}")
        )
        for q in queues
        if q in present
    ]
    if not parts:
        return {}
    cur = await conn.execute(sql.SQL(" UNION ALL ").join(parts))
    return {str(q): f"{at}|{msg_id}" for q, at, msg_id in await cur.fetchall()}


async def work_queues(conn: AsyncConnection) -> list[str]:
    """Every queue but the dead-letter queues."""
    cur = await conn.execute(
        "SELECT queue_name FROM pgmq.meta WHERE queue_name NOT LIKE '%%\\_dlq' ORDER BY queue_name"
    )
    return [str(r[0]) for r in await cur.fetchall()]
