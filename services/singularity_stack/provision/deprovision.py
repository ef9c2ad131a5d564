"""Dropping what the provisioner made: one Singularity instance (its database, role and reply queues),
the instances retired by a lower instance count, or a whole stack. Used when a stack's deletion policy
says Delete, and by `provision --drop-retired`."""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from singularity_stack.contract import REPLIES
from singularity_stack.provision.provisioner import check_owner, with_database
from singularity_stack.topology import MAX_INSTANCES, StackLayout, dead_letter_queue, instance_id, reply_queue


def _drop_database_and_role(conn: psycopg.Connection, database: str, role: str) -> list[str]:
    dropped = []
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))
        dropped.append(f"database {database}")
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        dropped.append(f"role {role}")
    return dropped


def drop_instance(admin_dsn: str, layout: StackLayout, index: int) -> list[str]:
    """Remove instance `index` of a stack: its reply queues first (they hold grants to its role)."""
    instance = instance_id(index)
    role = layout.role(instance)
    dropped: list[str] = []
    with psycopg.connect(with_database(admin_dsn, layout.shared_queue_database), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'pgmq'").fetchone():
            existing = {r[0] for r in conn.execute("SELECT queue_name FROM pgmq.meta")}
            for kind in REPLIES:
                for queue in (reply_queue(kind, instance), dead_letter_queue(reply_queue(kind, instance))):
                    if queue in existing:
                        conn.execute("SELECT pgmq.drop_queue(%s)", (queue,))
                        dropped.append(f"queue {queue}")
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            # what is left granted to the role in shared_queue (schema usage, the throttle table)
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        dropped += _drop_database_and_role(conn, layout.database(instance), role)
    return dropped


def instances_on_server(admin_dsn: str, layout: StackLayout) -> list[int]:
    """The indexes of the stack's Singularity instances that have a database or a role on the server,
    whatever its instance count (retired instances included)."""
    stem = layout.role("singularity_")  # + the index
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles UNION SELECT datname FROM pg_database")]
    found = set()
    for name in names:
        rest = name[len(stem) :] if name.startswith(stem) else ""
        if re.fullmatch(r"[1-9][0-9]*", rest) and int(rest) <= MAX_INSTANCES:
            found.add(int(rest))
    return sorted(found)


def drop_retired(admin_dsn: str, layout: StackLayout) -> list[str]:
    """Remove every instance above the layout's count (its database, role and reply queues)."""
    dropped: list[str] = []
    for index in instances_on_server(admin_dsn, layout):
        if index > layout.instances:
            dropped += drop_instance(admin_dsn, layout, index)
    return dropped


def drop_stack(admin_dsn: str, layout: StackLayout, owner: str | None = None) -> list[str]:
    """Remove every database and role of a stack, retired instances' too (the queues go with shared_queue).

    `owner` ("<namespace>/<name>"): when the databases are recorded as another stack's (same names), raises
    ProvisionError and drops nothing."""
    if owner is not None:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            check_owner(conn, layout, owner)
    retired = [i for i in instances_on_server(admin_dsn, layout) if i > layout.instances]
    dropped: list[str] = []
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        dropped += _drop_database_and_role(conn, layout.shared_queue_database, layout.analytics_role)
        for logical in (*layout.owners, *map(instance_id, retired)):
            dropped += _drop_database_and_role(conn, layout.database(logical), layout.role(logical))
    return dropped
