"""Who may write which pgmq archive, on real PostgreSQL: consumers their queues' (as pgmq.archive needs), and,
for the NATS path of the migration, a replier the archives of the reply queues it sends to (provision/
privileges.py). Nobody else, and writing an archive never lets a role read it. Written out from the design's
table, as tests/test_isolation.py is."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql
from test_isolation import ALL_QUEUES, INSTANCES, REPLY_KINDS, ROLES, queue_connections, two_instances  # noqa: F401

NEXUS_REQUESTS = {"llm_requests", "approval_requests", "question_requests"}


def replies(kinds: list[str], instances: list[str]) -> set[str]:
    return {f"{k}_{i}" for k in kinds for i in instances}


WRITES_ARCHIVE: dict[str, set[str]] = {
    "centralcloud": set(ALL_QUEUES),  # the owner
    "nexus": NEXUS_REQUESTS | replies(["llm_results", "approval_responses", "question_responses"], INSTANCES),
    "genesis": {"job_requests"} | replies(["job_results"], INSTANCES),
    "centralcloud_analytics": set(),
    **{i: replies(REPLY_KINDS, [i]) for i in INSTANCES},
}


def outcome(conn: psycopg.Connection, query: sql.Composable) -> bool:
    try:
        with conn.transaction():
            conn.execute(query)
            raise psycopg.Rollback()
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


@pytest.mark.parametrize("role", ROLES)
def test_archive_write_matrix(queue_connections, role):  # noqa: F811
    conn = queue_connections[role]
    mismatches = []
    for queue in ALL_QUEUES:
        archive = sql.Identifier("pgmq", f"a_{queue}")
        write = sql.SQL(
            "INSERT INTO {} (msg_id, vt, message) VALUES (-1, now(), '{{}}') ON CONFLICT (msg_id) DO NOTHING "
            "RETURNING msg_id"
        ).format(archive)
        ok = outcome(conn, write)
        if ok != (queue in WRITES_ARCHIVE[role]):
            mismatches.append(f"{role} write archive {queue}: {'allowed' if ok else 'denied'}")
        reads = outcome(conn, sql.SQL("SELECT message FROM {}").format(archive))
        if reads != (role in ("centralcloud", "centralcloud_analytics")):
            mismatches.append(f"{role} read archive {queue}: {'allowed' if reads else 'denied'}")
    assert not mismatches, "\n".join(mismatches)
