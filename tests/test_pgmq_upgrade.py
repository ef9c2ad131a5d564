"""pgmq upgrades in place: a shared queue installed from an older pgmq release's SQL, with messages in flight,
is brought to the packaged version by the next provisioning run; what cannot be upgraded safely says how.

The older SQL is the real one: pgmq 1.11.1, from the PyPI package pgmq 1.1.3, which scripts/setup.sh --test
downloads into .venv/share/old-pgmq.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest

from singularity_stack.postgres.installation import find_installation
from singularity_stack.postgres.pgmq_install import SQL_INSTALL_MARK, installed_pgmq, with_pgmq_extension
from singularity_stack.provision import pgmq_upgrade
from singularity_stack.provision.errors import PgmqUpgradeRequired
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult, with_database
from singularity_stack.topology import StackLayout
from singularity_stack_testing.postgres import throwaway_cluster

OLD_WHEEL = Path(sys.prefix) / "share" / "old-pgmq" / "pgmq-1.1.3-py3-none-any.whl"
OLD = "1.11.1"
NEW = pgmq_upgrade.packaged_version()


@pytest.fixture(scope="module")
def old_sql() -> str:
    if not OLD_WHEEL.exists():
        pytest.fail(f"{OLD_WHEEL} is missing: run scripts/setup.sh --test (it downloads pgmq 1.1.3)", pytrace=False)
    with zipfile.ZipFile(OLD_WHEEL) as wheel:
        assert wheel.read("pgmq/sql/VERSION").decode().split()[-1] == OLD
        return wheel.read("pgmq/sql/pgmq.sql").decode()


def provision_on_old_pgmq(admin_dsn: str, prefix: str, old_sql: str, monkeypatch) -> ProvisionResult:
    """A stack as an older image made it: its shared queue on pgmq 1.11.1, its queues created there."""
    layout = StackLayout(2, prefix)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{layout.shared_queue_database}"')
    with psycopg.connect(with_database(admin_dsn, layout.shared_queue_database)) as conn:
        conn.execute(old_sql)
        conn.execute(f"COMMENT ON SCHEMA pgmq IS 'pgmq {OLD} {SQL_INSTALL_MARK}'")
    # The older image knew no newer pgmq: its provisioning leaves 1.11.1 as it is.
    with monkeypatch.context() as older_image:
        older_image.setattr(pgmq_upgrade, "packaged_version", lambda: OLD)
        return Provisioner(admin_dsn, layout, report=lambda _: None).run()


def rows(conn: psycopg.Connection, table: str) -> list[tuple[object, ...]]:
    return conn.execute(
        f"SELECT msg_id, read_ct, enqueued_at, vt, message, headers FROM pgmq.{table} ORDER BY msg_id"
    ).fetchall()


def test_an_sql_install_is_upgraded_with_its_queues_messages_and_in_flight_reads(admin_dsn, old_sql, monkeypatch):
    old = provision_on_old_pgmq(admin_dsn, "pgup1_", old_sql, monkeypatch)
    layout = old.layout
    url = {name: creds.shared_queue_url for name, creds in old.credentials.items()}
    with psycopg.connect(url["singularity_1"], autocommit=True) as sender:
        sent = [
            sender.execute("SELECT * FROM pgmq.send('llm_requests', %s::jsonb)", (json.dumps({"n": n}),)).fetchone()[0]
            for n in range(5)
        ]
    with psycopg.connect(url["nexus"], autocommit=True) as nexus:
        in_flight = [r[0] for r in nexus.execute("SELECT msg_id FROM pgmq.read('llm_requests', 600, 2)")]
        nexus.execute("SELECT pgmq.archive('llm_requests', %s)", (sent[4],))
    shared = with_database(admin_dsn, layout.shared_queue_database)
    with psycopg.connect(shared) as conn:
        before = {t: rows(conn, t) for t in ("q_llm_requests", "a_llm_requests")}
        assert installed_pgmq(conn).version == OLD
    assert len(before["q_llm_requests"]) == 4 and len(before["a_llm_requests"]) == 1

    again = Provisioner(admin_dsn, layout, report=lambda _: None, known_passwords=old.passwords).run()

    assert f"upgraded pgmq {OLD} -> {NEW} (sql)" in again.changes
    assert (again.pgmq.method, again.pgmq.version) == ("sql", NEW)
    with psycopg.connect(shared) as conn:
        assert installed_pgmq(conn).version == NEW
        # the packaged SQL is really there (a function 1.11.1 does not have), and the old schema is gone
        assert conn.execute("SELECT to_regproc('pgmq.read_grouped_head_with_poll')").fetchone()[0] is not None
        assert conn.execute("SELECT to_regnamespace('pgmq_before_upgrade')").fetchone()[0] is None
        # every queue, owned by CentralCloud as before, with notifications on the work queues
        queues = dict(
            conn.execute(
                "SELECT m.queue_name, pg_get_userbyid(c.relowner) FROM pgmq.meta m "
                "JOIN pg_class c ON c.oid = format('pgmq.%I', 'q_' || m.queue_name)::regclass"
            ).fetchall()
        )
        assert set(queues) == set(layout.queues) and set(queues.values()) == {layout.role("centralcloud")}
        notifying = {r[0] for r in conn.execute("SELECT queue_name FROM pgmq.notify_insert_throttle")}
        assert notifying == set(layout.work_queues)
        # the messages, ids, read counts, visibility times and vouched senders, unchanged
        after = {t: rows(conn, t) for t in before}
    assert after == before
    assert all(row[5]["sender"] == "singularity_1" for row in after["q_llm_requests"])

    with psycopg.connect(url["nexus"], autocommit=True) as nexus:
        # the messages read before the upgrade are still in flight (not redelivered early), then settle
        visible = [r[0] for r in nexus.execute("SELECT msg_id FROM pgmq.read('llm_requests', 600, 10)")]
        assert sorted(visible) == sorted(set(sent[:4]) - set(in_flight))
        for msg_id in in_flight:
            assert nexus.execute("SELECT pgmq.archive('llm_requests', %s)", (msg_id,)).fetchone()[0] is True
    with psycopg.connect(url["singularity_1"], autocommit=True) as sender:
        newer = sender.execute("SELECT * FROM pgmq.send('llm_requests', '{\"n\": 5}')").fetchone()[0]
        assert newer > max(sent)  # ids go on, never reused
        # isolation holds on the new tables: an instance cannot read Nexus's requests
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            sender.execute("SELECT * FROM pgmq.read('llm_requests', 30, 1)")
    with psycopg.connect(shared) as conn:
        stamped = conn.execute("SELECT headers FROM pgmq.q_llm_requests WHERE msg_id = %s", (newer,)).fetchone()[0]
    assert stamped["sender"] == "singularity_1"  # the sender stamp is on the new table too


def test_an_unrecorded_sql_version_is_left_alone_and_says_how_to_go_on(admin_dsn, old_sql, monkeypatch):
    old = provision_on_old_pgmq(admin_dsn, "pgup2_", old_sql, monkeypatch)
    shared = with_database(admin_dsn, old.layout.shared_queue_database)
    with psycopg.connect(shared, autocommit=True) as conn:
        conn.execute("COMMENT ON SCHEMA pgmq IS NULL")
    with pytest.raises(PgmqUpgradeRequired) as required:
        Provisioner(admin_dsn, old.layout, report=lambda _: None, known_passwords=old.passwords).run()
    assert "without a recorded version" in str(required.value) and "COMMENT ON SCHEMA pgmq" in required.value.command
    with psycopg.connect(shared) as conn:  # nothing was changed
        assert conn.execute("SELECT to_regproc('pgmq.read_grouped_head_with_poll')").fetchone()[0] is None


def test_an_extension_without_an_update_path_says_the_exact_command(open_tmp, old_sql):
    cluster = throwaway_cluster(with_pgmq_extension(find_installation(), open_tmp / "pg", {OLD: old_sql}))
    with cluster, psycopg.connect(cluster.dsn()) as conn:
        conn.execute(f"CREATE EXTENSION pgmq VERSION '{OLD}'")
        conn.commit()
        installed = installed_pgmq(conn)
        assert (installed.method, installed.version) == ("extension", OLD)
        with pytest.raises(PgmqUpgradeRequired) as required:
            pgmq_upgrade.ensure_current_pgmq(conn, StackLayout(1), installed)
    assert required.value.command.endswith(f"ALTER EXTENSION pgmq UPDATE TO '{NEW}' in database shared_queue")
    assert "no update script" in required.value.reason


def test_the_operator_reports_queue_not_ready_with_the_command_and_rolls_nothing(
    kube, pg_cluster, admin_dsn, old_sql, monkeypatch
):
    from kubernetes import client, config

    from singularity_operator import objects
    from singularity_operator.controller import StackController
    from singularity_operator.kube import Kube

    api_client = config.new_client_from_config(config_file=str(kube.kubeconfig))
    core = client.CoreV1Api(api_client)
    namespace, stack = "pgmq-upgrade", "old"
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        old = provision_on_old_pgmq(admin_dsn, objects.database_prefix(namespace, stack), old_sql, monkeypatch)
        with psycopg.connect(with_database(admin_dsn, old.layout.shared_queue_database), autocommit=True) as conn:
            conn.execute("COMMENT ON SCHEMA pgmq IS NULL")  # a version nobody recorded: not upgraded blindly
        core.create_namespaced_secret(
            namespace,
            {"metadata": {"name": "pg-admin"}, "stringData": {"username": "postgres", "password": pg_cluster.password}},
        )
        external = {"host": pg_cluster.host, "port": pg_cluster.port, "adminSecret": {"name": "pg-admin"}}
        kube_api = Kube(api_client)
        for logical, entry in old.credentials.items():  # what the operator wrote when it made the stack
            kube_api.apply(objects.credentials_secret(stack, namespace, logical, entry.model_dump()))
        events: list[tuple[str, ...]] = []
        controller = StackController(kube_api, adopt=lambda obj: None, event=lambda *e: events.append(e))
        outcome = controller.reconcile(stack, namespace, {"postgres": {"external": external}})
        verdicts = {v.type: v for v in outcome.verdicts}
        queue = verdicts["QueueReady"]
        assert (queue.ok, queue.reason) == (False, "PgmqUpgradeRequired"), verdicts["DatabasesReady"].message
        assert "to upgrade: check its version" in queue.message
        assert verdicts["DatabasesReady"].ok
        assert events[-1][:2] == ("Warning", "PgmqUpgradeRequired")
        assert client.AppsV1Api(api_client).list_namespaced_deployment(namespace).items == []  # nothing rolled
    finally:
        core.delete_namespace(namespace)
