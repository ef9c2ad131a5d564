"""Creating a stack's queues and their privileges: run by the provisioner and by CentralCloud at start.

Must run as the CentralCloud role (the provisioner uses SET ROLE), so CentralCloud owns every
queue table and grants on them are the owner's. Idempotent: existing queues are left alone.

Every request is bound to the role that sent it: a BEFORE INSERT trigger on each request queue's
table writes the login role (`session_user`, which SET ROLE cannot change) into the message's
headers, over whatever the sender put there, as `sender_role` and, without the stack's name
prefix, `sender` ("singularity_2"). Senders hold no UPDATE on these tables, so it stays true.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from singularity_stack.contract import REQUESTS
from singularity_stack.provision import privileges
from singularity_stack.topology import NOTIFY_THROTTLE_MS, StackLayout

log = logging.getLogger(__name__)

SENDER_TRIGGER = "stamp_sender"
# TG_ARGV[0] is the stack's name prefix. A role outside the stack gets a null `sender`, which no
# consumer accepts. search_path is pinned: the function runs with the sender's session settings.
STAMP_SENDER_BODY = """
DECLARE
    login text := session_user;
    prefix text := TG_ARGV[0];
BEGIN
    NEW.headers := CASE
            WHEN NEW.headers IS NULL THEN '{}'::jsonb
            WHEN jsonb_typeof(NEW.headers) = 'object' THEN NEW.headers
            ELSE jsonb_build_object('sent', NEW.headers)
        END || jsonb_build_object(
            'sender_role', login,
            'sender', CASE WHEN starts_with(login, prefix) THEN substr(login, length(prefix) + 1) END
        );
    RETURN NEW;
END
"""


def ensure_sender_stamps(
    conn: psycopg.Connection, layout: StackLayout, already_stamped: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """(Re)create the stamping function if its body differs and add the trigger to every request
    queue that lacks it; returns the queues that got it. Runs as the queue tables' owner.

    `already_stamped`: queues whose messages were stamped by this trigger before (a pgmq upgrade copied
    them into a new table), so they are not marked unvouched."""
    current = conn.execute("SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure('pgmq.stamp_sender()')").fetchone()
    if current is None or current[0] != STAMP_SENDER_BODY:
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION pgmq.stamp_sender() RETURNS trigger LANGUAGE plpgsql "
                "SET search_path = pg_catalog, pg_temp AS {}"
            ).format(sql.Literal(STAMP_SENDER_BODY))
        )
    stamped = []
    for queue in REQUESTS:
        table = sql.Identifier("pgmq", f"q_{queue}")
        exists = conn.execute(
            "SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
            (f"pgmq.q_{queue}", SENDER_TRIGGER),
        ).fetchone()
        if exists:
            continue
        conn.execute(
            sql.SQL("CREATE TRIGGER {} BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION pgmq.stamp_sender({})").format(
                sql.Identifier(SENDER_TRIGGER), table, sql.Literal(layout.prefix)
            )
        )
        # Messages already queued were never stamped: whatever sender they name is unvouched. The
        # trigger's lock holds off new inserts until commit, so none slips in between.
        if queue in already_stamped:
            stamped.append(queue)
            continue
        conn.execute(
            sql.SQL(
                "UPDATE {} SET headers = jsonb_build_object('unvouched', headers) "
                "WHERE headers IS NOT NULL AND headers <> '{{}}'::jsonb"
            ).format(table)
        )
        stamped.append(queue)
        log.info("request queue %s now records each message's sender", queue)
    return stamped


def create_queues(conn: psycopg.Connection, queues: list[str], notifying: list[str]) -> None:
    """Create `queues` (with insert notifications on those in `notifying`), in one round trip each: pgmq's own
    functions, over an array. Runs as the queue owner; the caller commits."""
    conn.execute("SELECT pgmq.create(q) FROM unnest(%s::text[]) AS q", (queues,))
    if notifying:
        conn.execute(
            "SELECT pgmq.enable_notify_insert(q, %s) FROM unnest(%s::text[]) AS q", (NOTIFY_THROTTLE_MS, notifying)
        )


# Which wanted privileges a role lacks, in one query: a missing table counts as lacking (its GRANT then says so).
MISSING = """
SELECT DISTINCT i FROM unnest(%s::int[], %s::text[], %s::text[], %s::text[], %s::text[]) AS w(i, who, tab, col, what)
WHERE (CASE WHEN col IS NULL THEN has_table_privilege(who, to_regclass(format('pgmq.%%I', tab)), what)
            ELSE has_column_privilege(who, to_regclass(format('pgmq.%%I', tab)), col, what) END) IS NOT TRUE
"""


def missing_privileges(conn: psycopg.Connection, wanted: list[privileges.Privilege]) -> list[privileges.Privilege]:
    """The privileges of `wanted` not held yet, in its order: a rerun grants nothing (each GRANT rewrites its
    table's catalog row, and a stack of N instances has about 45 N of them)."""
    rows = [(i, *check) for i, privilege in enumerate(wanted) for check in privileges.checks(privilege)]
    if not rows:
        return []
    columns = [list(column) for column in zip(*rows, strict=True)]
    lacking = {r[0] for r in conn.execute(MISSING, columns)}
    return [privilege for i, privilege in enumerate(wanted) if i in lacking]


def ensure_queues(conn: psycopg.Connection, layout: StackLayout) -> list[str]:
    """Create missing queues (with insert notifications on the work queues), apply the queue privileges not held
    yet and the sender stamps; returns the queues created. The caller commits."""
    existing = {r[0] for r in conn.execute("SELECT queue_name FROM pgmq.meta")}
    created = [queue for queue in layout.queues if queue not in existing]
    if created:
        work = set(layout.work_queues)
        create_queues(conn, created, [queue for queue in created if queue in work])
    notifying: dict[str, int] = dict(
        conn.execute("SELECT queue_name, throttle_interval_ms FROM pgmq.notify_insert_throttle")
    )
    for queue in layout.work_queues:
        if queue not in notifying:
            conn.execute("SELECT pgmq.enable_notify_insert(%s, %s)", (queue, NOTIFY_THROTTLE_MS))
        elif notifying[queue] != NOTIFY_THROTTLE_MS:
            conn.execute("SELECT pgmq.update_notify_insert(%s, %s)", (queue, NOTIFY_THROTTLE_MS))
    for statement in privileges.grouped_statements(missing_privileges(conn, privileges.queue_privileges(layout))):
        conn.execute(statement)
    ensure_sender_stamps(conn, layout)
    return created
