"""Each service's schema migrations, applied with yoyo-migrations as the service's own role.

The applied versions live in yoyo's `_yoyo_migration` table of each database, so they can be
queried with SQL or with `singularity-stack migrations --database-url URL`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import psycopg
from yoyo import get_backend, read_migrations

MIGRATIONS_ROOT = Path(str(files("singularity_stack") / "migrations"))


def service_kind(owner: str) -> str:
    """The migrations a private database gets: every Singularity instance shares one schema."""
    return "singularity" if owner.startswith("singularity_") else owner


def _yoyo_url(database_url: str) -> str:
    return database_url.replace("postgresql://", "postgresql+psycopg://", 1)


def available_migrations(kind: str) -> list[str]:
    return sorted(m.id for m in read_migrations(str(MIGRATIONS_ROOT / kind)))


def apply_migrations(kind: str, database_url: str) -> list[str]:
    """Apply what is pending (under yoyo's lock, so concurrent runs are safe); returns the ids applied."""
    backend = get_backend(_yoyo_url(database_url))
    try:
        migrations = read_migrations(str(MIGRATIONS_ROOT / kind))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [m.id for m in pending]
    finally:
        backend.connection.close()


def applied_migrations(database_url: str) -> list[str]:
    """Ids of the migrations applied to a database, oldest first (empty before the first run)."""
    with psycopg.connect(database_url) as conn:
        exists = conn.execute("SELECT to_regclass('_yoyo_migration')").fetchone()
        if not exists or exists[0] is None:
            return []
        rows = conn.execute("SELECT migration_id FROM _yoyo_migration ORDER BY applied_at_utc, migration_id")
        return [r[0] for r in rows]
