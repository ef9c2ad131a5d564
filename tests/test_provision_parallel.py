"""The provisioner on many databases at once, on real PostgreSQL: its connections stay within the budget's
headroom, a rerun writes nothing, a lost privilege comes back, and a failure on a worker says what failed."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from singularity_stack.provision import budget, privileges
from singularity_stack.provision import provisioner as prov
from singularity_stack.provision.provisioner import Provisioner, ProvisionError, with_database
from singularity_stack.topology import NOTIFY_THROTTLE_MS, StackLayout

# 20 instances: 24 databases and 168 queues, more than a worker's share of each (prov.QUEUE_CHUNK queues).
INSTANCES = 20


class PeakConnections:
    """The most connections `user` had open at once while it ran, sampled every few milliseconds."""

    def __init__(self, admin_dsn: str, user: str) -> None:
        self.admin_dsn, self.user = admin_dsn, user
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
                    (self.user,),
                ).fetchone()
                self.peak = max(self.peak, row[0] if row else 0)
                time.sleep(0.002)

    def __enter__(self) -> PeakConnections:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def catalog_versions(admin_dsn: str, layout: StackLayout) -> dict[str, str]:
    """The row version (xmin) of every queue's tables and of the stack's databases and roles: a GRANT, REVOKE or
    ALTER writes a new one even when it changes nothing. (pgmq's own catalog tables and schema are left out: their
    ten schema-wide GRANTs still run at each reconcile.)"""
    with psycopg.connect(with_database(admin_dsn, layout.shared_queue_database)) as conn:
        rows = conn.execute(
            "SELECT 'rel ' || relname, xmin::text FROM pg_class WHERE relnamespace = 'pgmq'::regnamespace"
            " AND relname ~ '^[qa]_'"
            " UNION ALL SELECT 'db ' || datname, xmin::text FROM pg_database WHERE starts_with(datname, %s)"
            " UNION ALL SELECT 'role ' || rolname, xmin::text FROM pg_authid WHERE starts_with(rolname, %s)",
            (layout.prefix, layout.prefix),
        ).fetchall()
    return dict(rows)


def test_many_databases_and_queues_within_the_headroom_and_a_rerun_writes_nothing(admin_dsn):
    layout = StackLayout(INSTANCES, "wide_")
    with PeakConnections(admin_dsn, "postgres") as first_run:
        first = Provisioner(admin_dsn, layout, report=lambda _: None, migrate=False).run()
    assert prov.MAX_CONNECTIONS <= budget.HEADROOM
    assert 3 <= first_run.peak <= prov.MAX_CONNECTIONS  # several at once, never more than it says
    # every change once, in the layout's order, as one at a time would report them
    databases = [c.removeprefix("created database ") for c in first.changes if c.startswith("created database")]
    assert databases == [layout.shared_queue_database, *(layout.database(o) for o in layout.owners)]
    queues = [c.removeprefix("created queue ") for c in first.changes if c.startswith("created queue")]
    assert queues == list(layout.queues)
    assert first.applied == {logical: [] for logical in layout.owners}  # new, not migrated: nothing read

    with psycopg.connect(admin_dsn) as conn:
        made = conn.execute(
            "SELECT datname, pg_get_userbyid(datdba), has_database_privilege('public', oid, 'CONNECT')"
            " FROM pg_database WHERE starts_with(datname, 'wide_')"
        ).fetchall()
    owners = {layout.shared_queue_database: layout.role("centralcloud")}
    owners |= {layout.database(o): layout.role(o) for o in layout.owners}
    assert sorted(made) == sorted((name, owner, False) for name, owner in owners.items())
    with psycopg.connect(first.credentials["centralcloud"].shared_queue_url) as conn:
        meta = {r[0] for r in conn.execute("SELECT queue_name FROM pgmq.meta")}
        notifying = dict(conn.execute("SELECT queue_name, throttle_interval_ms FROM pgmq.notify_insert_throttle"))
        tables = set(conn.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'pgmq'").fetchall())
        lacking = privileges_lacking(conn, layout)
    assert meta == set(layout.queues)
    assert notifying == dict.fromkeys(layout.work_queues, NOTIFY_THROTTLE_MS)
    assert {(f"{kind}_{q}", layout.role("centralcloud")) for q in layout.queues for kind in "qa"} <= tables
    assert lacking == []

    before = catalog_versions(admin_dsn, layout)
    with PeakConnections(admin_dsn, "postgres") as rerun:
        again = Provisioner(admin_dsn, layout, known_passwords=first.passwords, report=lambda _: None, migrate=False)
        second = again.run()
    assert second.changes == []
    assert second.applied == {logical: [] for logical in layout.owners}  # read from each database this time
    assert catalog_versions(admin_dsn, layout) == before  # no GRANT, REVOKE or ALTER ran
    assert rerun.peak <= prov.MAX_CONNECTIONS


def privileges_lacking(conn: psycopg.Connection, layout: StackLayout) -> list[privileges.Privilege]:
    from singularity_stack.provision.queues import missing_privileges

    return missing_privileges(conn, privileges.queue_privileges(layout))


def test_a_revoked_privilege_is_granted_again_and_only_it(admin_dsn):
    layout = StackLayout(1, "regrant_")
    first = Provisioner(admin_dsn, layout, report=lambda _: None, migrate=False).run()
    shared = with_database(admin_dsn, layout.shared_queue_database)
    instance = layout.role("singularity_1")
    with psycopg.connect(shared, autocommit=True) as conn:
        conn.execute(f'REVOKE INSERT ON pgmq.q_llm_requests FROM "{instance}"')
        conn.execute(f'REVOKE SELECT (msg_id) ON pgmq.a_llm_results_singularity_1 FROM "{instance}"')
        assert privileges_lacking(conn, layout) == [
            (instance, "INSERT", "q_llm_requests"),
            (instance, "SELECT (msg_id)", "a_llm_results_singularity_1"),
        ]
        untouched = conn.execute("SELECT xmin::text FROM pg_class WHERE relname = 'q_code_jobs'").fetchone()
    Provisioner(admin_dsn, layout, known_passwords=first.passwords, report=lambda _: None, migrate=False).run()
    with psycopg.connect(shared) as conn:
        assert privileges_lacking(conn, layout) == []
        assert conn.execute("SELECT xmin::text FROM pg_class WHERE relname = 'q_code_jobs'").fetchone() == untouched
    with psycopg.connect(first.credentials["singularity_1"].shared_queue_url, autocommit=True) as sender:
        assert sender.execute("SELECT * FROM pgmq.send('llm_requests', '{}')").fetchone()[0] >= 1


def test_a_database_a_worker_cannot_create_is_named_and_no_connection_is_left(admin_dsn):
    """An admin that may create databases only for CentralCloud's role: shared_queue and CentralCloud's own are
    made, the next database fails on a worker, and the error names it."""
    layout = StackLayout(3, "narrow_")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE narrow_admin LOGIN CREATEROLE CREATEDB PASSWORD 'narrow-admin-password'")
        conn.execute("CREATE ROLE narrow_centralcloud LOGIN PASSWORD 'cc-password'")
        conn.execute("GRANT narrow_centralcloud TO narrow_admin")  # PostgreSQL 15: may own databases as it
    rest = admin_dsn.split("://", 1)[1].split("@", 1)[1]
    narrow = f"postgresql://narrow_admin:narrow-admin-password@{rest}"
    known = {"narrow_centralcloud": "cc-password"}
    with pytest.raises(ProvisionError, match=r"^creating database narrow_genesis failed: must be member of role"):
        Provisioner(narrow, layout, known_passwords=known, report=lambda _: None, migrate=False).run()
    with psycopg.connect(admin_dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'narrow_admin'").fetchone()
        made = {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, 'narrow_')")}
    assert left == (0,)
    assert {"narrow_shared_queue", "narrow_centralcloud"} <= made
    assert "narrow_genesis" not in made
