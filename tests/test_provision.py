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
