"""The backup and restore scripts (provision/backup.py) on real PostgreSQL + pgmq: a provisioned stack with
tasks, approval history and queue messages is dumped, dropped, restored and compared, table by table."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from singularity_stack.cli import main
from singularity_stack.postgres.cluster import LocalCluster
from singularity_stack.provision import backup
from singularity_stack.provision import credentials as creds
from singularity_stack.provision.deprovision import drop_stack
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult, with_database
from singularity_stack.topology import StackLayout


def fingerprint(admin_dsn: str, layout: StackLayout) -> dict[str, object]:
    """Every table's rows (as text, hashed), every queue table's privileges, every database's owner and ACL."""
    seen: dict[str, object] = {}
    with psycopg.connect(admin_dsn) as conn:
        for name, owner, acl in conn.execute(
            "SELECT datname, pg_get_userbyid(datdba), datacl::text FROM pg_database WHERE datname = ANY(%s)",
            (backup.stack_databases(layout),),
        ):
            seen[f"database {name}"] = (owner, acl)
    for database in backup.stack_databases(layout):
        with psycopg.connect(with_database(admin_dsn, database)) as conn:
            tables = conn.execute(
                "SELECT schemaname, tablename, tableowner FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
            ).fetchall()
            for schema, table, owner in tables:
                rows = conn.execute(
                    sql.SQL(
                        "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t"
                    ).format(sql.Identifier(schema, table))
                ).fetchone()
                acl = conn.execute(
                    "SELECT relacl::text FROM pg_class WHERE oid = %s::regclass", (f'"{schema}"."{table}"',)
                ).fetchone()
                seen[f"{database}.{schema}.{table}"] = (owner, rows, acl)
    return seen


def fill(result: ProvisionResult) -> dict[str, str]:
    """A task with an approval decision, Nexus's approval history, queue messages (one archived)."""
    task, request = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(result.credentials["singularity_1"].database_url) as conn:
        conn.execute("INSERT INTO agents (id) VALUES ('agent-a')")
        conn.execute(
            "INSERT INTO tasks (id, agent_id, description, language, state) "
            "VALUES (%s, 'agent-a', 'print a greeting', 'python', 'succeeded')",
            (task,),
        )
        conn.execute(
            "INSERT INTO steps (task_id, seq, phase, name, kind, request_id, state, request, deadline) "
            "VALUES (%s, 1, 'completion', 'approval', 'approval', %s, 'done', '{}', now() + interval '1 hour')",
            (task, request),
        )
        conn.execute(
            "INSERT INTO decisions (request_id, task_id, kind, approved, decided_by) "
            "VALUES (%s, %s, 'approval', true, 'alice')",
            (request, task),
        )
    with psycopg.connect(result.credentials["nexus"].database_url) as conn:
        conn.execute(
            "INSERT INTO hitl_requests (request_id, kind, instance, agent_id, payload, state, decided_by) "
            "VALUES (%s, 'approval', 'singularity_1', 'agent-a', '{}', 'approved', 'alice')",
            (request,),
        )
        conn.execute(
            "INSERT INTO hitl_audit (request_id, action, actor) "
            "VALUES (%s, 'received', 'nexus'), (%s, 'approved', 'alice')",
            (request, request),
        )
    with psycopg.connect(result.credentials["singularity_1"].shared_queue_url) as conn:
        for n in range(3):
            conn.execute("SELECT pgmq.send('llm_requests', %s::jsonb)", (json.dumps({"n": n}),))
    with psycopg.connect(result.credentials["nexus"].shared_queue_url) as conn:
        conn.execute("SELECT pgmq.archive('llm_requests', (SELECT min(msg_id) FROM pgmq.q_llm_requests))")
    return {"task": task, "request": request}


@pytest.fixture
def backups(open_tmp: Path) -> Path:
    return open_tmp


def dump(admin_dsn: str, tools: Path, layout: StackLayout, root: Path, retention: int = 3) -> dict[str, object]:
    env = {**backup.libpq_environment(admin_dsn), **backup.dump_environment(layout, str(root), retention)}
    return backup.run_script(backup.dump_script(), env, tools).report


def restore(admin_dsn: str, tools: Path, root: Path, name: str = "latest") -> dict[str, object]:
    env = {**backup.libpq_environment(admin_dsn), "BACKUP_ROOT": str(root), "RESTORE_BACKUP": name}
    return backup.run_script(backup.restore_script(), env, tools).report


def test_a_stack_dumped_dropped_and_restored_has_its_rows_queues_and_grants(
    admin_dsn, pg_cluster: LocalCluster, provision_stack, backups
):
    result = provision_stack(2, prefix="bkr_")
    ids = fill(result)
    tools = pg_cluster.installation.bindir
    before = fingerprint(admin_dsn, result.layout)
    report = dump(admin_dsn, tools, result.layout, backups)
    name = str(report["backup"])
    assert backup.BACKUP_NAME.fullmatch(name) and report["databases"] == 6
    assert int(str(report["sizeBytes"])) > 10_000
    assert sorted(p.name for p in (backups / name).iterdir()) == sorted(
        ["globals.sql", "roles", "databases", "stack.json"]
        + [f"{d}.dump" for d in backup.stack_databases(result.layout)]
    )
    assert "PASSWORD" not in (backups / name / "globals.sql").read_text()  # no credential on the volume

    drop_stack(admin_dsn, result.layout)
    assert restore(admin_dsn, tools, backups) == {"restored": name, "databases": 6, "instances": 2}
    after = fingerprint(admin_dsn, result.layout)
    assert after == before and len(after) > 40

    # the roles came back without passwords; given the stack's own, the provisioner finds nothing to change
    assert backup.passwordless_roles(admin_dsn, result.layout) == sorted(backup.stack_roles(result.layout))
    backup.set_passwords(admin_dsn, result.passwords)
    assert backup.passwordless_roles(admin_dsn, result.layout) == []
    again = Provisioner(admin_dsn, result.layout, known_passwords=result.passwords, report=lambda _: None).run()
    assert again.changes == []
    with psycopg.connect(result.credentials["singularity_1"].database_url) as conn:
        assert conn.execute("SELECT state FROM tasks WHERE id = %s", (ids["task"],)).fetchone() == ("succeeded",)
        assert conn.execute("SELECT decided_by FROM decisions").fetchone() == ("alice",)
    with psycopg.connect(result.credentials["nexus"].shared_queue_url) as conn:  # the queues work on
        read = conn.execute("SELECT message FROM pgmq.read('llm_requests', 30, 10)").fetchall()
        assert sorted(r[0]["n"] for r in read) == [1, 2]
    with psycopg.connect(result.credentials["singularity_1"].shared_queue_url) as conn:
        new_id = conn.execute("SELECT pgmq.send('llm_requests', '{\"n\": 3}')").fetchone()[0]
        assert new_id > 3  # the queue's sequence came back too: no msg_id is reused

    # a second restore onto the same server refuses before changing anything
    with pytest.raises(backup.BackupError, match="already has bkr_shared_queue"):
        restore(admin_dsn, tools, backups)


def test_retention_keeps_the_newest_and_a_half_written_backup_is_never_restored(
    admin_dsn, pg_cluster: LocalCluster, provision_stack, backups
):
    result = provision_stack(1, prefix="bkt_")
    tools = pg_cluster.installation.bindir
    for old in ("20200101T000000Z", "20200102T000000Z", "20200103T000000Z"):
        (backups / old).mkdir()
    (backups / "not-a-backup").mkdir()  # never counted, never removed
    report = dump(admin_dsn, tools, result.layout, backups, retention=2)
    assert report["removed"] == 2
    assert sorted(p.name for p in backups.iterdir()) == sorted(
        ["20200103T000000Z", str(report["backup"]), "not-a-backup"]
    )
    # a backup that died half-way is left as .partial-*; `latest` is the newest complete one
    (backups / ".partial-29990101T000000Z").mkdir()
    assert backup.backup_layout(backups, "latest") == (str(report["backup"]), result.layout)
    with pytest.raises(backup.BackupError, match="incomplete"):
        restore(admin_dsn, tools, backups, "20200103T000000Z")


@pytest.mark.parametrize("name", ["../etc", "20200101T000000Z/../../x", "20200101T000000Z\n../x", "", "latest2"])
def test_a_backup_name_that_is_a_path_is_refused(name, admin_dsn, pg_cluster: LocalCluster, backups):
    with pytest.raises(backup.BackupError, match="not 'latest' nor a backup's name"):
        backup.check_backup_name(name)
    with pytest.raises(backup.BackupError, match="not 'latest' nor a backup's name"):
        restore(admin_dsn, pg_cluster.installation.bindir, backups, name or "x")


def test_dump_refuses_a_bad_retention_and_says_why(admin_dsn, pg_cluster: LocalCluster, provision_stack, backups):
    layout = StackLayout(1, "bkz_")
    env = {**backup.libpq_environment(admin_dsn), **backup.dump_environment(layout, str(backups), 1)}
    env["BACKUP_RETENTION"] = "0"
    with pytest.raises(backup.BackupError, match="BACKUP_RETENTION must be a whole number of at least 1"):
        backup.run_script(backup.dump_script(), env, pg_cluster.installation.bindir)
    env["BACKUP_RETENTION"] = "1"
    env["BACKUP_DATABASES"] = "x;rm"
    with pytest.raises(backup.BackupError, match="invalid database name"):
        backup.run_script(backup.dump_script(), env, pg_cluster.installation.bindir)
    assert list(backups.iterdir()) == []


def test_cli_backup_then_restore_gives_the_roles_passwords_and_provisions(
    admin_dsn, provision_stack, backups, open_tmp: Path, capsys
):
    result = provision_stack(1, prefix="bkc_")
    ids = fill(result)
    assert main(["backup", "--admin-dsn", admin_dsn, "--prefix", "bkc_", "--backup-dir", str(backups)]) == 0
    out = capsys.readouterr().out
    assert "backup 2" in out and "6 databases" not in out and "5 databases" in out
    drop_stack(admin_dsn, result.layout)
    credentials = open_tmp / "restored.json"
    assert (
        main(["restore", "--admin-dsn", admin_dsn, "--backup-dir", str(backups), "--credentials-out", str(credentials)])
        == 0
    )
    assert "restored backup" in capsys.readouterr().out
    restored = creds.read(credentials).active
    assert restored["singularity_1"].database_url != result.credentials["singularity_1"].database_url  # new passwords
    with psycopg.connect(restored["singularity_1"].database_url) as conn:
        assert conn.execute("SELECT description FROM tasks WHERE id = %s", (ids["task"],)).fetchone() == (
            "print a greeting",
        )
    # once more: the databases are there now; one line says so, no traceback
    assert (
        main(["restore", "--admin-dsn", admin_dsn, "--backup-dir", str(backups), "--credentials-out", str(credentials)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: restore failed: the server already has bkc_") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_restore_of_a_missing_backup_is_one_line(admin_dsn, backups, open_tmp: Path, capsys):
    code = main(["restore", "--admin-dsn", admin_dsn, "--backup-dir", str(backups), "--backup", "../../etc",
                 "--credentials-out", str(open_tmp / "c.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: backup name '../../etc' is not") and len(err.strip().splitlines()) == 1
    code = main(["restore", "--admin-dsn", admin_dsn, "--backup-dir", str(backups), "--credentials-out",
                 str(open_tmp / "c.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: no backup in {backups}"


def test_a_server_that_does_not_answer_is_one_line_with_the_client_s_reason(pg_cluster: LocalCluster, backups):
    env = {**backup.dump_environment(StackLayout(1, "bkn_"), str(backups), 1), "PGHOST": "127.0.0.1", "PGPORT": "1"}
    with pytest.raises(backup.BackupError) as refused:
        backup.run_script(backup.dump_script(), env, pg_cluster.installation.bindir)
    message = str(refused.value)
    assert message.startswith("backup failed: pg_dumpall --globals-only: see the lines above (")
    assert "Connection refused" in message and "\n" not in message


def test_a_tampered_globals_file_runs_nothing_but_the_stack_s_plain_role_lines(
    admin_dsn, pg_cluster: LocalCluster, provision_stack, backups
):
    result = provision_stack(1, prefix="bkx_")
    tools = pg_cluster.installation.bindir
    name = str(dump(admin_dsn, tools, result.layout, backups)["backup"])
    globals_sql = backups / name / "globals.sql"
    globals_sql.write_text(
        globals_sql.read_text()
        + "ALTER ROLE bkx_nexus WITH SUPERUSER;\n"  # a plain line: run, then the provisioner's attributes win
        + "ALTER ROLE bkx_genesis WITH LOGIN; CREATE ROLE bkx_intruder SUPERUSER LOGIN;\n"  # more in it: not run
        + "CREATE ROLE bkx_intruder2;\n"  # not the stack's
    )
    drop_stack(admin_dsn, result.layout)
    restore(admin_dsn, tools, backups, name)
    with psycopg.connect(admin_dsn) as conn:
        roles = dict(conn.execute("SELECT rolname, rolsuper FROM pg_roles WHERE rolname LIKE 'bkx_%'").fetchall())
    assert roles == dict.fromkeys(backup.stack_roles(result.layout), False)
