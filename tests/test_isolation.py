"""The isolation matrix: every role by every database and queue operation, checked on real PostgreSQL.

The expectations are written out from the design's tables, independently of the provisioner's
own grant list, so a wrong grant shows up as a mismatch here.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from singularity_stack.provision.credentials import postgres_url
from singularity_stack.provision.provisioner import ProvisionResult

REQUESTS = ["llm_requests", "approval_requests", "question_requests", "job_requests"]
REPLY_KINDS = ["llm_results", "job_results", "approval_responses", "question_responses"]
INSTANCES = ["singularity_1", "singularity_2"]
WORK = REQUESTS + [f"{k}_{i}" for i in INSTANCES for k in REPLY_KINDS]
ALL_QUEUES = WORK + [q + "_dlq" for q in WORK]
ROLES = ["centralcloud", "genesis", "nexus", *INSTANCES, "centralcloud_analytics"]
CONSUME_OPS = ["read", "archive", "delete", "set_vt"]
OPS = ["send", *CONSUME_OPS, "read_archive", "prune_archive"]


def replies(instance: str, kinds: list[str]) -> set[str]:
    return {f"{k}_{instance}" for k in kinds}


def dlq(queues: set[str]) -> set[str]:
    return {q + "_dlq" for q in queues}


NEXUS_CONSUMES = {"llm_requests", "approval_requests", "question_requests"}
NEXUS_SENDS = set().union(*(replies(i, ["llm_results", "approval_responses", "question_responses"]) for i in INSTANCES))
# role -> operation -> queues where it is allowed (the design's "What Each Service CAN See" table)
EXPECTED: dict[str, dict[str, set[str]]] = {
    "centralcloud": {op: set(ALL_QUEUES) for op in OPS},  # owner: creates, manages and prunes every queue
    "nexus": {"send": NEXUS_SENDS | dlq(NEXUS_CONSUMES), **{op: NEXUS_CONSUMES for op in CONSUME_OPS}},
    "genesis": {
        "send": set().union(*(replies(i, ["job_results"]) for i in INSTANCES)) | {"job_requests_dlq"},
        **{op: {"job_requests"} for op in CONSUME_OPS},
    },
    "centralcloud_analytics": {"read_archive": set(ALL_QUEUES)},
}
for instance in INSTANCES:
    EXPECTED[instance] = {
        "send": set(REQUESTS) | dlq(replies(instance, REPLY_KINDS)),
        **{op: replies(instance, REPLY_KINDS) for op in CONSUME_OPS},
    }

CONNECT = {role: {role, "shared_queue"} for role in ROLES}
CONNECT["centralcloud_analytics"] = {"shared_queue"}
DATABASES = ["shared_queue", "centralcloud", "genesis", "nexus", *INSTANCES]


def statement(op: str, queue: str) -> sql.Composable:
    q = sql.Literal(queue)
    return {
        "send": sql.SQL("SELECT pgmq.send({}, '{{}}'::jsonb)").format(q),
        "read": sql.SQL("SELECT * FROM pgmq.read({}, 30, 1)").format(q),
        "archive": sql.SQL("SELECT pgmq.archive({}, 1::bigint)").format(q),
        "delete": sql.SQL("SELECT pgmq.delete({}, 1::bigint)").format(q),
        "set_vt": sql.SQL("SELECT * FROM pgmq.set_vt({}, 1::bigint, 0)").format(q),
        "read_archive": sql.SQL("SELECT * FROM {}").format(sql.Identifier("pgmq", f"a_{queue}")),
        "prune_archive": sql.SQL("DELETE FROM {} WHERE archived_at < now() - interval '90 days'").format(
            sql.Identifier("pgmq", f"a_{queue}")
        ),
    }[op]


def allowed(conn: psycopg.Connection, query: sql.Composable) -> bool:
    """Run `query` in a savepoint that is always rolled back; False on a permission error."""
    try:
        with conn.transaction():
            conn.execute(query)
            raise psycopg.Rollback()
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


@pytest.fixture(scope="module")
def two_instances(provision_stack) -> ProvisionResult:
    return provision_stack(2)


def role_url(stack: ProvisionResult, role: str, database: str) -> str:
    layout = stack.layout
    name = layout.role(role)
    host, port = stack.credentials["centralcloud"].database_url.rsplit("@", 1)[1].split("/")[0].split(":")
    return postgres_url(name, stack.passwords[name], host, int(port), layout.database(database))


@pytest.fixture(scope="module")
def queue_connections(two_instances) -> Iterator[dict[str, psycopg.Connection]]:
    conns = {role: psycopg.connect(role_url(two_instances, role, "shared_queue")) for role in ROLES}
    yield conns
    for conn in conns.values():
        conn.close()


@pytest.mark.parametrize("role", ROLES)
def test_database_connect_matrix(two_instances, role):
    mismatches = []
    for database in DATABASES:
        try:
            psycopg.connect(role_url(two_instances, role, database)).close()
            ok = True
        except psycopg.OperationalError as error:
            assert "permission denied" in str(error), error
            ok = False
        if ok != (database in CONNECT[role]):
            mismatches.append(f"{role} connect {database}: {'allowed' if ok else 'denied'}")
    assert not mismatches


@pytest.mark.parametrize("role", ROLES)
def test_queue_operation_matrix(queue_connections, role):
    conn = queue_connections[role]
    mismatches = []
    for queue in ALL_QUEUES:
        for op in OPS:
            ok = allowed(conn, statement(op, queue))
            if ok != (queue in EXPECTED[role].get(op, set())):
                mismatches.append(f"{role} {op} {queue}: {'allowed' if ok else 'denied'}")
    assert not mismatches, "\n".join(mismatches)


def drop_queue(conn: psycopg.Connection, queue: str) -> bool:
    """Whether pgmq.drop_queue really dropped (in a rolled-back savepoint). For a role that cannot even
    see the table pgmq answers False; for one that sees it PostgreSQL refuses the DROP."""
    try:
        with conn.transaction():
            dropped = conn.execute("SELECT pgmq.drop_queue(%s)", (queue,)).fetchone()[0]
            raise psycopg.Rollback()
    except psycopg.errors.InsufficientPrivilege:
        return False
    return bool(dropped)


@pytest.mark.parametrize("role", ROLES)
def test_only_centralcloud_creates_drops_and_purges_queues(queue_connections, role):
    conn = queue_connections[role]
    owner = role == "centralcloud"
    assert allowed(conn, sql.SQL("SELECT pgmq.create({})").format(sql.Literal(f"made_by_{role}"))) is owner
    for queue in ("llm_requests", "job_requests", "llm_results_singularity_1"):
        assert drop_queue(conn, queue) is owner
    # purge truncates the table: only the owner may, not even the consumer
    assert allowed(conn, sql.SQL("SELECT pgmq.purge_queue('job_requests')")) is owner


def test_sender_cannot_read_what_it_sent(queue_connections):
    """Singularity may learn the id of its message (RETURNING msg_id) but not read the queue's messages."""
    conn = queue_connections["singularity_1"]
    msg_id = conn.execute("SELECT * FROM pgmq.send('llm_requests', '{\"secret\": 1}'::jsonb)").fetchone()[0]
    conn.commit()
    assert msg_id > 0
    assert not allowed(conn, sql.SQL("SELECT message FROM pgmq.q_llm_requests"))
    # and the notify trigger fired under the sender's own privileges
    nexus = queue_connections["nexus"]
    rows = nexus.execute("SELECT message FROM pgmq.read('llm_requests', 0, 10)").fetchall()
    nexus.rollback()
    assert {"secret": 1} in [r[0] for r in rows]


@pytest.mark.parametrize("role", ROLES)
def test_only_the_owner_can_switch_off_the_sender_stamp(queue_connections, role):
    """Requests are bound to their sender by a trigger on the request queues (provision/queues.py): no
    other role may disable or drop it, nor rewrite a queued request's headers unless it consumes the queue."""
    conn = queue_connections[role]
    owner = role == "centralcloud"
    stamped = conn.execute(
        "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid WHERE t.tgname = 'stamp_sender'"
    ).fetchall()
    conn.rollback()
    assert sorted(r[0] for r in stamped) == sorted(f"q_{q}" for q in REQUESTS)
    for queue in REQUESTS:
        table = sql.Identifier("pgmq", f"q_{queue}")
        for change in ("ALTER TABLE {} DISABLE TRIGGER stamp_sender", "DROP TRIGGER stamp_sender ON {}"):
            assert allowed(conn, sql.SQL(change).format(table)) is owner, (change, queue)
        rewrite = sql.SQL('UPDATE {} SET headers = \'{{"sender": "singularity_2"}}\'').format(table)
        assert allowed(conn, rewrite) is (owner or queue in EXPECTED[role].get("read", set())), queue
