"""The provisioner on real PostgreSQL: idempotent, additive, never touching an existing password."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import psycopg
import pytest

from singularity_stack.provision import credentials as creds
from singularity_stack.provision.migrations import applied_migrations, available_migrations
from singularity_stack.provision.provisioner import Provisioner, ProvisionError
from singularity_stack.securefile import write_private
from singularity_stack.topology import StackLayout

CLI = [sys.executable, "-m", "singularity_stack.cli"]


def can_login(url: str) -> bool:
    try:
        psycopg.connect(url).close()
        return True
    except psycopg.OperationalError:
        return False


def queue_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM pgmq.meta").fetchone()[0]


def test_first_run_creates_everything_and_second_changes_nothing(admin_dsn):
    layout = StackLayout(2, "idem_")
    first = Provisioner(admin_dsn, layout, report=lambda _: None).run()
    assert "created database idem_shared_queue" in first.changes
    assert "created role idem_singularity_2" in first.changes
    assert set(first.credentials) == {"centralcloud", "genesis", "nexus", "singularity_1", "singularity_2"}
    assert first.migrations["singularity_1"] == available_migrations("singularity")

    second = Provisioner(admin_dsn, layout, known_passwords=first.passwords, report=lambda _: None).run()
    assert second.changes == []
    assert second.credentials == first.credentials
    assert second.pgmq.newly_installed is False
    assert all(can_login(entry.database_url) for entry in first.credentials.values())


def test_raising_n_adds_only_the_new_instances(admin_dsn):
    small = Provisioner(admin_dsn, StackLayout(1, "grow_"), report=lambda _: None).run()
    big = Provisioner(admin_dsn, StackLayout(3, "grow_"), known_passwords=small.passwords, report=lambda _: None).run()
    assert sorted(c for c in big.changes if "role" in c) == [
        "created role grow_singularity_2",
        "created role grow_singularity_3",
    ]
    assert not any("shared_queue" in c or "nexus" in c for c in big.changes)
    assert big.credentials["singularity_1"] == small.credentials["singularity_1"]
    assert queue_count(big.credentials["centralcloud"].shared_queue_url) == 2 * (4 + 4 * 3)
    assert can_login(big.credentials["singularity_3"].database_url)


def test_existing_role_with_unknown_password_is_refused_not_reset(admin_dsn):
    first = Provisioner(admin_dsn, StackLayout(1, "lost_"), report=lambda _: None).run()
    with pytest.raises(ProvisionError, match="role lost_centralcloud exists but its password is not known"):
        Provisioner(admin_dsn, StackLayout(1, "lost_"), report=lambda _: None).run()
    assert can_login(first.credentials["centralcloud"].database_url)


def test_rotating_a_password_changes_only_that_role(admin_dsn):
    first = Provisioner(admin_dsn, StackLayout(1, "rot_"), report=lambda _: None).run()
    rotated = Provisioner(
        admin_dsn, StackLayout(1, "rot_"), known_passwords=first.passwords, rotate=["rot_nexus"], report=lambda _: None
    ).run()
    assert rotated.changes == ["rotated password of role rot_nexus"]
    assert not can_login(first.credentials["nexus"].database_url)
    assert can_login(rotated.credentials["nexus"].database_url)
    assert rotated.credentials["genesis"] == first.credentials["genesis"]


def test_public_endpoint_goes_into_the_credentials(admin_dsn):
    from singularity_stack.provision.provisioner import Endpoint

    result = Provisioner(
        admin_dsn, StackLayout(1, "pub_"), public_endpoint=Endpoint("pg.stack.svc", 5432), report=lambda _: None
    ).run()
    assert "@pg.stack.svc:5432/pub_nexus" in result.credentials["nexus"].database_url
    assert "@pg.stack.svc:5432/pub_shared_queue" in result.credentials["nexus"].shared_queue_url


def test_cli_provision_writes_credentials_and_reuses_them(admin_dsn, tmp_path):
    out = tmp_path / "credentials.json"
    args = [
        *CLI,
        "provision",
        "--admin-dsn",
        admin_dsn,
        "--singularity-instances",
        "2",
        "--credentials-out",
        str(out),
        "--prefix",
        "cli_",
    ]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    data = json.loads(out.read_text())
    assert set(data) == {"centralcloud", "genesis", "nexus", "singularity_1", "singularity_2"}
    assert set(data["nexus"]) == {"database_url", "shared_queue_url"}
    assert "shared_queue_analytics_url" in data["centralcloud"]

    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "0 change(s)" in again.stdout
    assert json.loads(out.read_text()) == data

    listed = subprocess.run(
        [*CLI, "migrations", "--database-url", data["singularity_2"]["database_url"]], capture_output=True, text=True
    )
    assert listed.stdout.split() == available_migrations("singularity")
    assert applied_migrations(data["centralcloud"]["database_url"]) == available_migrations("centralcloud")


def test_cli_refuses_unknown_password_with_a_clear_message(admin_dsn, tmp_path):
    args = [
        *CLI,
        "provision",
        "--admin-dsn",
        admin_dsn,
        "--credentials-out",
        str(tmp_path / "a.json"),
        "--prefix",
        "cli2_",
    ]
    assert subprocess.run(args, capture_output=True).returncode == 0
    other = [*args[:-3], str(tmp_path / "b.json"), "--prefix", "cli2_"]
    refused = subprocess.run(other, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "--rotate-password cli2_centralcloud" in refused.stderr


def test_passwords_survive_a_failure_after_the_roles_step(admin_dsn, tmp_path, monkeypatch):
    """If a later step fails, the new passwords are already on disk: nothing is lost."""
    from singularity_stack.provision import provisioner as prov

    def broken(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prov.Provisioner, "_shared_queue", broken)
    out = tmp_path / "c.json"
    with pytest.raises(RuntimeError, match="disk full"):
        Provisioner(
            admin_dsn, StackLayout(1, "fail_"), report=lambda _: None, persist=lambda c: creds.save(out, c)
        ).run()
    saved = creds.load(out)
    assert can_login(saved["nexus"].database_url)
    monkeypatch.undo()
    done = Provisioner(
        admin_dsn, StackLayout(1, "fail_"), known_passwords=creds.known_passwords(saved), report=lambda _: None
    ).run()
    assert any(c.startswith("created queue") for c in done.changes)


def test_passwords_survive_a_failure_between_creating_roles_and_databases(admin_dsn, tmp_path):
    """An admin that may create roles but not databases: the roles are made, CREATE DATABASE fails. The
    passwords were kept before the first role existed, so a run with a proper admin finishes the job."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE half_admin LOGIN CREATEROLE NOCREATEDB PASSWORD 'half-admin-password'")
    half = admin_dsn.replace("postgres:", "half_admin:", 1).split("@")
    half_dsn = half[0].rsplit(":", 1)[0] + ":half-admin-password@" + half[1]
    out = tmp_path / "c.json"
    first: list[set[str]] = []

    def persist(credentials: dict[str, creds.ServiceCredentials]) -> None:
        with psycopg.connect(admin_dsn) as conn:  # which of the stack's roles exist when credentials are kept
            first.append({r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'halfway_%'")})
        creds.save(out, credentials)

    # what failed, in PostgreSQL's words, as a ProvisionError (the operator's ProvisionFailed, the CLI's one line)
    with pytest.raises(ProvisionError, match="creating database halfway_shared_queue failed: permission denied"):
        Provisioner(half_dsn, StackLayout(1, "halfway_"), report=lambda _: None, persist=persist).run()
    assert first[0] == set()  # kept before any role was created
    saved = creds.load(out)
    done = Provisioner(
        admin_dsn, StackLayout(1, "halfway_"), known_passwords=creds.known_passwords(saved), report=lambda _: None
    ).run()
    assert any(c.startswith("created database") for c in done.changes)
    assert all(can_login(entry.database_url) for entry in saved.values())


def provision_cli(admin_dsn: str, out, instances: int, prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *CLI,
            "provision",
            "--admin-dsn",
            admin_dsn,
            "--singularity-instances",
            str(instances),
            "--credentials-out",
            str(out),
            "--prefix",
            prefix,
        ],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(("prefix", "counts"), [("down_", (3, 1, 3)), ("demo_", (2, 1, 3))])
def test_cli_instance_count_goes_down_and_up_again(admin_dsn, tmp_path, prefix, counts):
    """Lowering N retires the instances above it (kept, credentials under "retired"); raising it reuses them."""
    first_n, low, high = counts
    out = tmp_path / "credentials.json"
    first = provision_cli(admin_dsn, out, first_n, prefix)
    assert first.returncode == 0, first.stderr
    before = json.loads(out.read_text())
    assert "retired" not in before
    last = f"singularity_{first_n}"
    with psycopg.connect(before[last]["database_url"]) as conn:
        conn.execute("CREATE TABLE kept (note text)")
        conn.execute("INSERT INTO kept VALUES ('written before scaling down')")

    down = provision_cli(admin_dsn, out, low, prefix)
    assert down.returncode == 0, down.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    lowered = json.loads(out.read_text())
    retired = [f"singularity_{i}" for i in range(low + 1, first_n + 1)]
    assert set(lowered) == {"centralcloud", "genesis", "nexus", "singularity_1", "retired"}
    assert lowered["retired"] == {name: before[name] for name in retired}
    assert creds.load(out) == {name: creds.ServiceCredentials(**before[name]) for name in lowered if name != "retired"}
    assert f"retired, kept and not started: {', '.join(retired)}" in down.stdout
    assert "0 change(s)" in down.stdout  # nothing dropped: databases, roles and reply queues stay
    assert queue_count(before["centralcloud"]["shared_queue_url"]) == 2 * (4 + 4 * first_n)
    assert can_login(before[last]["database_url"])

    up = provision_cli(admin_dsn, out, high, prefix)
    assert up.returncode == 0, up.stderr
    raised = json.loads(out.read_text())
    assert "retired" not in raised
    assert set(raised) == {"centralcloud", "genesis", "nexus", *(f"singularity_{i}" for i in range(1, high + 1))}
    assert {name: raised[name] for name in before} == before  # the same passwords, reused
    assert [line for line in up.stdout.splitlines() if "role" in line] == [
        f"  created role {prefix}singularity_{i}" for i in range(first_n + 1, high + 1)
    ]
    with psycopg.connect(raised[last]["database_url"]) as conn:
        assert conn.execute("SELECT note FROM kept").fetchall() == [("written before scaling down",)]
    assert all(can_login(entry["database_url"]) for entry in raised.values())


def test_a_file_without_retired_instances_still_reads(tmp_path):
    """Files written before the "retired" section existed read as before; retired passwords are known."""
    url = "postgresql://{0}:pw-{0}@localhost:5432/{0}"
    path = tmp_path / "old.json"
    entry = {"database_url": url.format("singularity_1"), "shared_queue_url": url.format("singularity_1")}
    write_private(path, json.dumps({"singularity_1": entry}))
    old = creds.read(path)
    assert old.active == {"singularity_1": creds.ServiceCredentials(**entry)} and old.retired == {}

    retired = creds.ServiceCredentials(database_url=url.format("singularity_2"), shared_queue_url=url.format("x"))
    creds.save(path, old.active, {"singularity_2": retired})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    new = creds.read(path)
    assert creds.load(path) == old.active and new.retired == {"singularity_2": retired}
    assert creds.known_passwords(new.everything())["singularity_2"] == "pw-singularity_2"
    assert creds.retire(new, {}) == {"singularity_1": old.active["singularity_1"], "singularity_2": retired}
    with pytest.raises(ValueError, match="not a service name"):
        creds.save(path, {"retired": retired})


def test_cli_drop_retired_drops_the_instances_above_n(admin_dsn, tmp_path):
    """Asked to (--drop-retired), a lower N drops the instances above it; raising N again starts them afresh."""
    out = tmp_path / "credentials.json"
    assert provision_cli(admin_dsn, out, 3, "dropr_").returncode == 0
    before = json.loads(out.read_text())
    dropped = subprocess.run(
        [
            *CLI,
            "provision",
            "--admin-dsn",
            admin_dsn,
            "--credentials-out",
            str(out),
            "--prefix",
            "dropr_",
            "--drop-retired",
        ],
        capture_output=True,
        text=True,
    )
    assert dropped.returncode == 0, dropped.stderr
    assert "  dropped database dropr_singularity_3" in dropped.stdout
    assert "  dropped role dropr_singularity_2" in dropped.stdout
    assert set(json.loads(out.read_text())) == {"centralcloud", "genesis", "nexus", "singularity_1"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not can_login(before["singularity_2"]["database_url"])
    assert queue_count(before["centralcloud"]["shared_queue_url"]) == 2 * (4 + 4 * 1)

    again = provision_cli(admin_dsn, out, 3, "dropr_")
    assert again.returncode == 0, again.stderr
    assert "  created database dropr_singularity_3" in again.stdout
    assert can_login(json.loads(out.read_text())["singularity_3"]["database_url"])


def test_drop_stack_drops_retired_instances_too(admin_dsn, tmp_path):
    from singularity_stack.provision.deprovision import drop_stack, instances_on_server

    out = tmp_path / "credentials.json"
    assert provision_cli(admin_dsn, out, 3, "dropall_").returncode == 0
    assert provision_cli(admin_dsn, out, 1, "dropall_").returncode == 0
    layout = StackLayout(1, "dropall_")
    assert instances_on_server(admin_dsn, layout) == [1, 2, 3]
    assert "database dropall_singularity_3" in drop_stack(admin_dsn, layout)
    assert instances_on_server(admin_dsn, layout) == []
