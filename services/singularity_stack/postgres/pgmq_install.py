"""Installing pgmq: `CREATE EXTENSION pgmq` where the server has it, else the SQL the PyPI `pgmq` package ships.

Tests, the local stack and the operator all install pgmq through `ensure_pgmq`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg
from pgmq.install import get_embedded_install_sql, get_embedded_sql_version, install_pgmq_sql
from psycopg import sql

from singularity_stack.postgres.installation import PostgresInstallation, private_library_dirs

Method = Literal["extension", "sql"]
SQL_INSTALL_MARK = "installed from the SQL shipped by the pgmq PyPI package"


@dataclass(frozen=True)
class PgmqInstall:
    method: Method
    version: str
    newly_installed: bool


def installed_pgmq(conn: psycopg.Connection) -> PgmqInstall | None:
    """What pgmq this database has, if any."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pgmq'").fetchone()
    if row:
        return PgmqInstall("extension", row[0], False)
    row = conn.execute(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = 'pgmq'"
    ).fetchone()
    if row is None:
        return None
    comment = row[0] or ""
    version = comment.split(" ", 2)[1] if comment.startswith("pgmq ") else "unknown"
    return PgmqInstall("sql", version, False)


def ensure_pgmq(conn: psycopg.Connection, prefer: Method | None = None) -> PgmqInstall:
    """Install pgmq into the connected database unless it is there already (idempotent).

    `prefer="sql"` forces the SQL install even where the extension is available.
    The connection must not be in autocommit mode: the SQL install runs as one transaction.
    """
    existing = installed_pgmq(conn)
    if existing:
        conn.commit()
        return existing
    available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'").fetchone()
    if available and prefer != "sql":
        conn.execute("CREATE EXTENSION pgmq")
        extension = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pgmq'").fetchone()
        conn.commit()
        return PgmqInstall("extension", extension[0] if extension else "unknown", True)
    version = get_embedded_sql_version()
    conn.commit()
    install_pgmq_sql(get_embedded_install_sql(), conn=conn)
    conn.execute(sql.SQL("COMMENT ON SCHEMA pgmq IS {}").format(f"pgmq {version} {SQL_INSTALL_MARK}"))
    conn.commit()
    return PgmqInstall("sql", version, True)


def with_pgmq_extension(
    base: PostgresInstallation, dest: Path, other_versions: Mapping[str, str] | None = None
) -> PostgresInstallation:
    """A copy of `base` whose share directory also holds the pgmq extension (control file + SQL).

    `other_versions` (version -> install SQL) adds older versions one can `CREATE EXTENSION pgmq VERSION`.

    PostgreSQL finds its share directory relative to its own executable, so the server
    binaries are copied into a mirror of the original layout under `dest`; everything else
    is symlinked. This gives tests (and images) a server where `CREATE EXTENSION pgmq` works.
    """
    bindir = base.bindir.resolve()
    sharedir = base.sharedir.resolve()
    pkglibdir = base.pg_config("pkglibdir").resolve()
    new_bindir = dest / bindir.relative_to("/")
    new_sharedir = dest / sharedir.relative_to("/")
    new_pkglibdir = dest / pkglibdir.relative_to("/")
    if not (new_bindir / "postgres").exists():
        new_bindir.mkdir(parents=True, exist_ok=True)
        for tool in ("postgres", "initdb", "pg_ctl", "pg_config"):
            shutil.copy2(bindir / tool, new_bindir / tool)
        if not new_pkglibdir.exists():
            new_pkglibdir.parent.mkdir(parents=True, exist_ok=True)
            new_pkglibdir.symlink_to(pkglibdir)
        new_sharedir.mkdir(parents=True, exist_ok=True)
        for entry in sharedir.iterdir():
            if entry.name != "extension":
                (new_sharedir / entry.name).symlink_to(entry)
        extdir = new_sharedir / "extension"
        extdir.mkdir()
        for entry in (sharedir / "extension").iterdir():
            (extdir / entry.name).symlink_to(entry)
        version = get_embedded_sql_version()
        (extdir / "pgmq.control").write_text(
            "comment = 'A lightweight message queue. Like AWS SQS and RSMQ but on Postgres.'\n"
            f"default_version = '{version}'\n"
            "schema = 'pgmq'\n"
            "relocatable = false\n"
            "superuser = true\n"
        )
        (extdir / f"pgmq--{version}.sql").write_text(get_embedded_install_sql())
        for other, script in (other_versions or {}).items():
            (extdir / f"pgmq--{other}.sql").write_text(script)
        for path in [dest, *dest.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o055)  # readable by the unprivileged server account
    return PostgresInstallation(new_bindir, f"{base.source}+pgmq-extension", private_library_dirs(bindir / "initdb"))
