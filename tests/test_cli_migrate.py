"""`singularity-stack migrate <service>`: this image's migrations applied to one service's database, as its role."""

from __future__ import annotations

import shutil

import psycopg
import pytest

from singularity_stack import cli
from singularity_stack.provision import migrations


def test_migrate_applies_what_is_pending_as_the_service_role_and_says_the_last(
    provision_stack, tmp_path, monkeypatch, capsys
):
    result = provision_stack(1)
    url = result.credentials["nexus"].database_url
    assert cli.main(["migrate", "nexus", "--database-url", url]) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"0 applied now, last applied {migrations.available_migrations('nexus')[-1]}")
    )

    # A newer image: one more migration in its package.
    newer = tmp_path / "migrations"
    shutil.copytree(migrations.MIGRATIONS_ROOT, newer)
    (newer / "nexus" / "0099.newer-image.sql").write_text("CREATE TABLE newer_image (id int PRIMARY KEY);\n")
    monkeypatch.setattr(migrations, "MIGRATIONS_ROOT", newer)
    monkeypatch.setenv("DATABASE_URL", url)
    assert cli.main(["migrate", "nexus"]) == 0
    out = capsys.readouterr().out
    assert "applied 0099.newer-image" in out and out.strip().endswith("last applied 0099.newer-image")
    with psycopg.connect(url) as conn:  # made by the service's own role: it owns what it made
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'newer_image'").fetchone()
    assert owner == (result.layout.role("nexus"),)


def test_a_failing_migration_is_one_line_and_rolled_back(provision_stack, tmp_path, monkeypatch, capsys):
    result = provision_stack(1)
    url = result.credentials["genesis"].database_url
    broken = tmp_path / "migrations"
    shutil.copytree(migrations.MIGRATIONS_ROOT, broken)
    (broken / "genesis" / "0099.broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT no_such_column FROM half_done;\n"
    )
    monkeypatch.setattr(migrations, "MIGRATIONS_ROOT", broken)
    assert cli.main(["migrate", "genesis", "--database-url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: migrating genesis:") and "no_such_column" in err[0]
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
        assert "0099.broken" not in migrations.applied_migrations(url)


def test_migrate_without_a_database_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert cli.main(["migrate", "singularity"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("service", ["singularity", "centralcloud"])
def test_migrate_knows_every_service(service):
    args = cli.build_parser().parse_args(["migrate", service, "--database-url", "postgresql://x"])
    assert args.func is cli.cmd_migrate
