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

import re
from collections.abc import Iterable

from psycopg import sql

from singularity_stack.contract import REQUESTS
from singularity_stack.topology import Access, Grant, StackLayout

PGMQ_CATALOG = ("meta", "notify_insert_throttle", "topic_bindings")


# (the privileges, as GRANT spells them; the pgmq table): what one role needs on one table.
TableGrant = tuple[str, str]


def _table_grants(grant: Grant) -> list[TableGrant]:
    queue, archive = f"q_{grant.queue}", f"a_{grant.queue}"
    if grant.access is Access.SEND:
        return [("INSERT", queue), ("SELECT (msg_id)", queue)]
    return [("SELECT, UPDATE, DELETE", queue), ("INSERT", archive), ("SELECT (msg_id)", archive)]


def _reply_archive_grants(queue: str) -> list[TableGrant]:
    return [("INSERT", f"a_{queue}"), ("SELECT (msg_id)", f"a_{queue}")]


def _statement(privileges: str, tables: list[str], role: str) -> sql.Composed:
    names = sql.SQL(", ").join(sql.Identifier("pgmq", table) for table in tables)
    return sql.SQL("GRANT " + privileges + " ON {} TO {}").format(names, sql.Identifier(role))


def grant_statements(grant: Grant, role: str) -> list[sql.Composed]:
    return [_statement(privileges, [table], role) for privileges, table in _table_grants(grant)]


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
    return [_statement(privileges, [table], role) for privileges, table in _reply_archive_grants(queue)]


# (role, the privileges as GRANT spells them, the pgmq table): one privilege a role holds on one table.
Privilege = tuple[str, str, str]


def queue_privileges(layout: StackLayout) -> list[Privilege]:
    """Every per-queue privilege of the layout, plus read-only archives for analytics; each once, in first-seen
    order."""
    replied = set(layout.work_queues) - set(REQUESTS)  # the reply queues (their dead-letter queues excluded)
    wanted: dict[Privilege, None] = {}
    for grant in layout.grants:
        role = layout.role(grant.role)
        tables = _table_grants(grant)
        if grant.access is Access.SEND and grant.queue in replied:
            tables += _reply_archive_grants(grant.queue)
        for privileges, table in tables:
            wanted[(role, privileges, table)] = None
    for queue in layout.queues:
        wanted[(layout.analytics_role, "SELECT", f"a_{queue}")] = None
    return list(wanted)


def grouped_statements(wanted: Iterable[Privilege]) -> list[sql.Composed]:
    """The same privileges as a GRANT per table would give, one GRANT per role and kind of privilege over all its
    tables (a stack of N instances has about 45 N of them: a statement each cost seconds)."""
    tables: dict[tuple[str, str], dict[str, None]] = {}  # (role, privileges) -> tables, in first-seen order
    for role, privileges, table in wanted:
        tables.setdefault((role, privileges), {})[table] = None
    return [_statement(privileges, list(found), role) for (role, privileges), found in tables.items()]


def queue_statements(layout: StackLayout) -> list[sql.Composed]:
    """Every per-queue privilege of the layout, grouped (see `grouped_statements`)."""
    return grouped_statements(queue_privileges(layout))


# (role, table, column or None, one privilege): what has_table_privilege / has_column_privilege check.
Check = tuple[str, str, str | None, str]


def checks(privilege: Privilege) -> list[Check]:
    """The single privileges a GRANT's privilege list gives: "SELECT, UPDATE, DELETE" is three, "SELECT (msg_id)"
    one on a column."""
    role, privileges, table = privilege
    column = re.fullmatch(r"(\w+) \((\w+)\)", privileges)
    if column:
        return [(role, table, column.group(2), column.group(1))]
    return [(role, table, None, kind.strip()) for kind in privileges.split(",")]
