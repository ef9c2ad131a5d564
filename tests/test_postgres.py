"""The local cluster and pgmq installation: both ways, on real servers (Debian's and the pgserver wheel's)."""

from __future__ import annotations

import os
import shutil

import psycopg
import pytest

from singularity_stack.postgres import installation as inst
from singularity_stack.postgres.cluster import LocalCluster
from singularity_stack.postgres.pgmq_install import ensure_pgmq, installed_pgmq, with_pgmq_extension
from singularity_stack_testing.postgres import throwaway_cluster


def installations() -> list[inst.PostgresInstallation]:
    found = [inst.find_installation()]
    wheel = inst._pgserver_bindir()
    if wheel and found[0].bindir != wheel:
        found.append(inst.PostgresInstallation(wheel, "pgserver"))
    return found


@pytest.fixture(params=installations(), ids=lambda i: f"{i.source}-{i.version}")
def base_installation(request) -> inst.PostgresInstallation:
    return request.param


def exercise_pgmq(cluster: LocalCluster, expected_method: str) -> None:
    with psycopg.connect(cluster.dsn()) as conn:
        assert installed_pgmq(conn) is None
        first = ensure_pgmq(conn)
        assert (first.method, first.newly_installed) == (expected_method, True)
        assert first.version == "1.13.0"
        again = ensure_pgmq(conn)
        assert (again.method, again.version, again.newly_installed) == (expected_method, "1.13.0", False)
        conn.execute("SELECT pgmq.create('probe')")
        msg_id = conn.execute("SELECT * FROM pgmq.send('probe', '{\"a\": 1}')").fetchone()[0]
        row = conn.execute("SELECT msg_id, message FROM pgmq.read('probe', 30, 1)").fetchone()
        assert row == (msg_id, {"a": 1})


def test_pgmq_from_sql_on_a_server_without_the_extension(base_installation):
    assert not base_installation.has_extension("pgmq")
    cluster = throwaway_cluster(base_installation)
    try:
        with cluster:
            exercise_pgmq(cluster, "sql")
    finally:
        shutil.rmtree(cluster.datadir, ignore_errors=True)


def test_pgmq_as_extension_where_the_server_has_it(base_installation, open_tmp):
    with_extension = with_pgmq_extension(base_installation, open_tmp / "pg")
    assert with_extension.has_extension("pgmq")
    cluster = throwaway_cluster(with_extension)
    try:
        with cluster:
            exercise_pgmq(cluster, "extension")
    finally:
        shutil.rmtree(cluster.datadir, ignore_errors=True)


def test_sql_install_can_be_forced_where_the_extension_exists(open_tmp):
    cluster = throwaway_cluster(with_pgmq_extension(inst.find_installation(), open_tmp / "pg"))
    try:
        with cluster, psycopg.connect(cluster.dsn()) as conn:
            assert ensure_pgmq(conn, prefer="sql").method == "sql"
            assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pgmq'").fetchone() == (0,)
    finally:
        shutil.rmtree(cluster.datadir, ignore_errors=True)


def test_falls_back_to_the_pgserver_wheel_without_system_binaries(monkeypatch):
    monkeypatch.delenv(inst.BINDIR_ENV, raising=False)
    monkeypatch.setattr(inst, "_debian_bindirs", lambda: [])
    monkeypatch.setattr(inst.shutil, "which", lambda name: None)
    found = inst.find_installation()
    assert found.source == "pgserver"
    assert found.version.split(".")[0] == "16"


def test_no_binaries_anywhere_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(inst.BINDIR_ENV, raising=False)
    monkeypatch.setattr(inst, "_debian_bindirs", lambda: [])
    monkeypatch.setattr(inst.shutil, "which", lambda name: None)
    monkeypatch.setattr(inst, "_pgserver_bindir", lambda: None)
    with pytest.raises(inst.NoPostgresError, match="install Debian's postgresql package"):
        inst.find_installation()


def test_cluster_survives_restart_and_keeps_data(open_tmp):
    cluster = LocalCluster(open_tmp / "c")
    with cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        cluster.restart("immediate")
        with psycopg.connect(cluster.dsn()) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
    assert not cluster.running
    # the superuser needs its password: no trust authentication anywhere
    cluster.start()
    try:
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(cluster.dsn().replace(cluster.password, "wrong"))
    finally:
        cluster.stop()


def test_runs_as_unprivileged_account_when_root():
    if os.geteuid() != 0:
        pytest.skip("only meaningful as root: checks the server does not run as root")
    cluster = throwaway_cluster()
    try:
        with cluster, psycopg.connect(cluster.dsn()) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            uid = os.stat(f"/proc/{pid}").st_uid
            assert uid != 0
    finally:
        shutil.rmtree(cluster.datadir, ignore_errors=True)


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    """Ports handed out for servers that bind later: an outgoing connection can never have taken them."""
    from singularity_stack.postgres.cluster import _ephemeral_range_start, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(10000 <= port < _ephemeral_range_start() for port in ports)
