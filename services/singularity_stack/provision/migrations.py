"""Each service's schema migrations, applied with yoyo-migrations as the service's own role.

The applied versions live in yoyo's `_yoyo_migration` table of each database, so they can be
queried with SQL or with `singularity-stack migrations --database-url URL`.
"""

from __future__ import annotations

import os
import threading
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg
from yoyo import get_backend, read_migrations

MIGRATIONS_ROOT = Path(str(files("singularity_stack") / "migrations"))


def service_kind(owner: str) -> str:
    """The migrations a private database gets: every Singularity instance shares one schema."""
    return "singularity" if owner.startswith("singularity_") else owner


def _yoyo_url(database_url: str) -> str:
    return database_url.replace("postgresql://", "postgresql+psycopg://", 1)


# Parsed migrations by (directory, what its files are): yoyo parses each SQL file with sqlparse, about 50 ms for a
# service's set, which the operator would otherwise pay again for every new database of a stack.
_parsed: dict[tuple[str, tuple[tuple[str, int, int], ...]], Any] = {}
_parsed_lock = threading.Lock()


def _read_migrations(kind: str) -> Any:
    """yoyo's MigrationList for `kind`, parsed once per content of its directory (a changed file, a new one:
    parsed again). Loaded under the lock, so threads share the parsed steps; yoyo keeps no state in them."""
    directory = str(MIGRATIONS_ROOT / kind)
    entries = [(e.name, e.stat()) for e in os.scandir(directory)] if os.path.isdir(directory) else []
    key = (directory, tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in entries)))
    with _parsed_lock:
        found = _parsed.get(key)
        if found is None:
            found = read_migrations(directory)
            for migration in found:
                migration.load()
            _parsed[key] = found
        return found


def available_migrations(kind: str) -> list[str]:
    return sorted(m.id for m in _read_migrations(kind))


def _applied(conn: Any) -> list[str]:
    cursor = conn.cursor()
    cursor.execute("SELECT to_regclass('_yoyo_migration')")
    exists = cursor.fetchone()
    if not exists or exists[0] is None:
        return []
    cursor.execute("SELECT migration_id FROM _yoyo_migration ORDER BY applied_at_utc, migration_id")
    return [r[0] for r in cursor.fetchall()]


def migrate(kind: str, database_url: str) -> tuple[list[str], list[str]]:
    """(the ids applied now, every id the database records afterwards, oldest first): `apply_migrations` and
    then `applied_migrations`, on yoyo's connection rather than one more."""
    backend = get_backend(_yoyo_url(database_url))
    try:
        with backend.lock():
            pending = backend.to_apply(_read_migrations(kind))
            backend.apply_migrations(pending)
        return [m.id for m in pending], _applied(backend.connection)
    finally:
        backend.connection.close()


def apply_migrations(kind: str, database_url: str) -> list[str]:
    """Apply what is pending (under yoyo's lock, so concurrent runs are safe); returns the ids applied."""
    return migrate(kind, database_url)[0]


def applied_migrations(database_url: str) -> list[str]:
    """Ids of the migrations applied to a database, oldest first (empty before the first run)."""
    with psycopg.connect(database_url) as conn:
        return _applied(conn)
