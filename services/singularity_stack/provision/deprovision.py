"""Dropping what the provisioner made: one Singularity instance (its database, role and reply queues),
or a whole stack. Used when a stack's deletion policy says Delete."""

from __future__ import annotations

import psycopg
from psycopg import sql

from singularity_stack.contract import REPLIES
from singularity_stack.provision.provisioner import with_database
from singularity_stack.topology import StackLayout, dead_letter_queue, instance_id, reply_queue


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


def drop_stack(admin_dsn: str, layout: StackLayout) -> list[str]:
    """Remove every database and role of a stack (the queues go with shared_queue)."""
    dropped: list[str] = []
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        dropped += _drop_database_and_role(conn, layout.shared_queue_database, layout.analytics_role)
        for logical in layout.owners:
            dropped += _drop_database_and_role(conn, layout.database(logical), layout.role(logical))
    return dropped
