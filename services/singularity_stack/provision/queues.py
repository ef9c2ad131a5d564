"""Creating a stack's queues and their privileges: run by the provisioner and by CentralCloud at start.

Must run as the CentralCloud role (the provisioner uses SET ROLE), so CentralCloud owns every
queue table and grants on them are the owner's. Idempotent: existing queues are left alone.
"""

from __future__ import annotations

import psycopg

from singularity_stack.provision import privileges
from singularity_stack.topology import NOTIFY_THROTTLE_MS, StackLayout


def ensure_queues(conn: psycopg.Connection, layout: StackLayout) -> list[str]:
    """Create missing queues (with insert notifications on the work queues) and (re)apply the queue
    privileges; returns the queues created. The caller commits."""
    existing = {r[0] for r in conn.execute("SELECT queue_name FROM pgmq.meta")}
    notifying = dict(conn.execute("SELECT queue_name, throttle_interval_ms FROM pgmq.notify_insert_throttle"))
    created = []
    for queue in layout.queues:
        if queue not in existing:
            conn.execute("SELECT pgmq.create(%s)", (queue,))
            created.append(queue)
    for queue in layout.work_queues:
        if queue not in notifying:
            conn.execute("SELECT pgmq.enable_notify_insert(%s, %s)", (queue, NOTIFY_THROTTLE_MS))
        elif notifying[queue] != NOTIFY_THROTTLE_MS:
            conn.execute("SELECT pgmq.update_notify_insert(%s, %s)", (queue, NOTIFY_THROTTLE_MS))
    for statement in privileges.queue_statements(layout):
        conn.execute(statement)
    return created
