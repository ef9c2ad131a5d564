"""Archive retention: archived messages older than SHARED_QUEUE_RETENTION_DAYS are pruned."""

from __future__ import annotations

import psycopg
from psycopg import sql


def prune_archives(owner_url: str, retention_days: int) -> dict[str, int]:
    """Delete archived messages older than the retention period from every queue's archive; queue → count."""
    pruned: dict[str, int] = {}
    with psycopg.connect(owner_url) as conn:
        queues = [r[0] for r in conn.execute("SELECT queue_name FROM pgmq.meta ORDER BY queue_name")]
        for queue in queues:
            cur = conn.execute(
                sql.SQL("DELETE FROM {} WHERE archived_at < now() - make_interval(days => %s)").format(
                    sql.Identifier("pgmq", f"a_{queue}")
                ),
                (retention_days,),
            )
            if cur.rowcount:
                pruned[queue] = cur.rowcount
    return pruned
