"""Pure functions: the SQL that gives each role exactly its queue operations in `shared_queue`.

pgmq's functions run with the caller's privileges, so table grants decide who can do what:
- send: INSERT on `pgmq.q_<queue>`, plus SELECT on `msg_id` for `RETURNING msg_id` (not on the messages);
  also the pgmq notify trigger's update of `pgmq.notify_insert_throttle`;
- consume (read, archive, delete, set_vt): SELECT, UPDATE, DELETE on `q_<queue>`, INSERT on `a_<queue>`
  and SELECT on its `msg_id`;
- analytics: SELECT on every archive `pgmq.a_<queue>` and on `pgmq.meta`, nothing else;
- a replier (Nexus, Genesis) also writes its replies' archive, INSERT on `a_<reply queue>` and SELECT on its
  `msg_id` (for ON CONFLICT), never reading it: a reply it sends on NATS during the migration reaches no pgmq
  queue, so it records it there itself and the history covers both paths (sharedqueue/nats_replies.py).
"""

from __future__ import annotations

from psycopg import sql

from singularity_stack.contract import REQUESTS
from singularity_stack.topology import Access, Grant, StackLayout

PGMQ_CATALOG = ("meta", "notify_insert_throttle", "topic_bindings")


def _table(prefix: str, queue: str) -> sql.Identifier:
    return sql.Identifier("pgmq", f"{prefix}_{queue}")


def grant_statements(grant: Grant, role: str) -> list[sql.Composed]:
    who = sql.Identifier(role)
    queue, archive = _table("q", grant.queue), _table("a", grant.queue)
    if grant.access is Access.SEND:
        return [
            sql.SQL("GRANT INSERT ON {} TO {}").format(queue, who),
            sql.SQL("GRANT SELECT (msg_id) ON {} TO {}").format(queue, who),
        ]
    return [
        sql.SQL("GRANT SELECT, UPDATE, DELETE ON {} TO {}").format(queue, who),
        sql.SQL("GRANT INSERT ON {} TO {}").format(archive, who),
        sql.SQL("GRANT SELECT (msg_id) ON {} TO {}").format(archive, who),
    ]


def schema_statements(layout: StackLayout) -> list[sql.Composed]:
    """Schema-level privileges: everyone may use pgmq; only CentralCloud may create queues in it."""
    owner = sql.Identifier(layout.role("centralcloud"))
    senders = [layout.role(r) for r in ("genesis", "nexus", *layout.instance_ids)]
    everyone = [layout.role(r) for r in layout.owners] + [layout.analytics_role]
    statements: list[sql.Composed] = [
        sql.SQL("GRANT USAGE ON SCHEMA pgmq TO {}").format(sql.SQL(", ").join(map(sql.Identifier, everyone))),
        sql.SQL("GRANT CREATE ON SCHEMA pgmq TO {}").format(owner),
    ]
    for table in PGMQ_CATALOG:
        statements.append(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(sql.Identifier("pgmq", table), owner)
        )
    throttle = sql.Identifier("pgmq", "notify_insert_throttle")
    who = sql.SQL(", ").join(map(sql.Identifier, senders))
    statements += [
        sql.SQL("GRANT SELECT (queue_name, throttle_interval_ms, last_notified_at) ON {} TO {}").format(throttle, who),
        sql.SQL("GRANT UPDATE (last_notified_at) ON {} TO {}").format(throttle, who),
        sql.SQL("GRANT SELECT ON {} TO {}").format(
            sql.Identifier("pgmq", "meta"), sql.Identifier(layout.analytics_role)
        ),
    ]
    return statements


def reply_archive_statements(queue: str, role: str) -> list[sql.Composed]:
    """What a replier needs to archive a reply it sent on NATS: append to the archive, never read it."""
    archive, who = _table("a", queue), sql.Identifier(role)
    return [
        sql.SQL("GRANT INSERT ON {} TO {}").format(archive, who),
        sql.SQL("GRANT SELECT (msg_id) ON {} TO {}").format(archive, who),
    ]


def queue_statements(layout: StackLayout) -> list[sql.Composed]:
    """Per-queue privileges for every grant of the layout, plus read-only archives for analytics."""
    replied = set(layout.work_queues) - set(REQUESTS)  # the reply queues (their dead-letter queues excluded)
    statements: list[sql.Composed] = []
    for grant in layout.grants:
        statements += grant_statements(grant, layout.role(grant.role))
        if grant.access is Access.SEND and grant.queue in replied:
            statements += reply_archive_statements(grant.queue, layout.role(grant.role))
    analytics = sql.Identifier(layout.analytics_role)
    for queue in layout.queues:
        statements.append(sql.SQL("GRANT SELECT ON {} TO {}").format(_table("a", queue), analytics))
    return statements
