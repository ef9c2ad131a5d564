"""Backups of a stack and restoring one: two small POSIX shell scripts, built here, run by the CLI and by
the operator's CronJob and Jobs (the project's PostgreSQL image has the client tools they call).

A backup is one directory `<root>/<YYYYMMDDTHHMMSSZ>`: `globals.sql` (pg_dumpall --globals-only, without
role passwords: the backup volume never holds a credential), `<database>.dump` per database of the stack
(pg_dump custom format), `roles`, `databases` and `stack.json` (prefix and instance count). It is written
under `.partial-<name>` and renamed when complete, so a backup that died half-way is never restored; the
oldest complete backups beyond the retention count are removed. The script writes one JSON line (name,
time, size) to `$BACKUP_REPORT` (a Pod's termination message).

A restore needs a server without the stack's databases and roles (a new stack's fresh PostgreSQL): it
creates the stack's roles from `globals.sql` (only those, without passwords), restores every database
with `pg_restore --create` (owners, grants, pgmq and its queues with their messages) and clears the
owner mark on shared_queue (the provisioner records the stack that now owns the data). The roles then
have no password; `passwordless_roles` / `set_passwords` give them the ones the stack's credentials
hold, after which the provisioner finds every role with a known password and provisions as usual.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from singularity_stack.provision.errors import ProvisionError
from singularity_stack.topology import StackLayout

BACKUP_NAME = re.compile(r"[0-9]{8}T[0-9]{6}Z")
LATEST = "latest"
# The CronJob writes its report where Kubernetes takes a container's termination message from.
TERMINATION_LOG = "/dev/termination-log"


class BackupError(ProvisionError):
    """A backup or restore cannot go on; the message says why in one line."""


def check_backup_name(name: str) -> str:
    """`name` if it is a backup's name (or "latest"); anything else (a path, `..`) is refused."""
    if name == LATEST or BACKUP_NAME.fullmatch(name):
        return name
    raise BackupError(
        f"backup name {name!r} is not 'latest' nor a backup's name (YYYYMMDDTHHMMSSZ, e.g. 20260101T020000Z)"
    )


def stack_databases(layout: StackLayout) -> list[str]:
    return [layout.shared_queue_database, *(layout.database(logical) for logical in layout.owners)]


def stack_roles(layout: StackLayout) -> list[str]:
    return [*(layout.role(logical) for logical in layout.owners), layout.analytics_role]


_COMMON = r"""set -eu
umask 077
die() {
    echo "$KIND failed: $*" >&2
    if [ -n "${REPORT:-}" ]; then printf '%s failed: %s\n' "$KIND" "$*" > "$REPORT" || true; fi
    exit 1
}
valid_name() { case "$1" in '' | *[!a-z0-9_]*) return 1 ;; esac; }
d='[0-9]'
is_backup() {  # YYYYMMDDTHHMMSSZ, nothing else (no path, no newline)
    case "$1" in $d$d$d$d$d$d$d${d}T$d$d$d$d$d${d}Z) return 0 ;; esac
    return 1
}
backups() { ls -1 "$root" | while read -r entry; do if is_backup "$entry"; then echo "$entry"; fi; done | sort; }
root=${BACKUP_ROOT:?BACKUP_ROOT: the directory holding the backups}
[ -d "$root" ] || die "$root is not a directory"
"""


def dump_script() -> str:
    """The backup: environment BACKUP_ROOT, BACKUP_DATABASES and BACKUP_ROLES (space-separated),
    BACKUP_RETENTION (backups kept), BACKUP_PREFIX, BACKUP_INSTANCES, BACKUP_REPORT (optional), and libpq's
    PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE for a superuser."""
    return (
        "KIND=backup\nREPORT=${BACKUP_REPORT:-}\n"
        + _COMMON
        + r"""retention=${BACKUP_RETENTION:-7}
case "$retention" in
    '' | *[!0-9]* | 0*) die "BACKUP_RETENTION must be a whole number of at least 1, not '$retention'" ;;
esac
instances=${BACKUP_INSTANCES:?}
case "$instances" in '' | *[!0-9]*) die "BACKUP_INSTANCES must be a whole number, not '$instances'" ;; esac
prefix=${BACKUP_PREFIX:-}
if [ -n "$prefix" ] && ! valid_name "$prefix"; then die "invalid prefix '$prefix'"; fi
for name in $BACKUP_ROLES; do valid_name "$name" || die "invalid role name '$name'"; done
for name in $BACKUP_DATABASES; do valid_name "$name" || die "invalid database name '$name'"; done
name=$(date -u +%Y%m%dT%H%M%SZ)
[ ! -e "$root/$name" ] || die "a backup named $name exists already"
rm -rf "$root"/.partial-*  # what a backup that died left behind (one runs at a time)
work="$root/.partial-$name"
mkdir "$work"
pg_dumpall --globals-only --no-role-passwords --no-tablespaces --file="$work/globals.sql" \
    || die "pg_dumpall --globals-only: see the lines above"
for db in $BACKUP_DATABASES; do
    pg_dump --format=custom --file="$work/$db.dump" --dbname="$db" || die "pg_dump of $db: see the lines above"
done
printf '%s\n' $BACKUP_ROLES > "$work/roles"
printf '%s\n' $BACKUP_DATABASES > "$work/databases"
printf '{"prefix": "%s", "instances": %s}\n' "$prefix" "$instances" > "$work/stack.json"
mv "$work" "$root/$name"
removed=0
count=$(backups | wc -l)
for old in $(backups | head -n "$((count > retention ? count - retention : 0))"); do
    rm -rf "${root:?}/$old"
    removed=$((removed + 1))
    echo "removed backup $old (beyond the retention of $retention)" >&2
done
size=$(du -sb "$root/$name" | cut -f1)
databases=$(printf '%s\n' $BACKUP_DATABASES | wc -l)
report=$(printf '{"backup": "%s", "completedAt": "%s", "sizeBytes": %s, "databases": %s, "removed": %s}' \
    "$name" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$size" "$databases" "$removed")
if [ -n "$REPORT" ]; then printf '%s\n' "$report" > "$REPORT"; fi
printf '%s\n' "$report"
"""
    )


def restore_script() -> str:
    """The restore: environment BACKUP_ROOT, RESTORE_BACKUP (a backup's name or "latest"), RESTORE_REPORT
    (optional), and libpq's PG* variables for a superuser (PGDATABASE: the database to connect to)."""
    return (
        "KIND=restore\nREPORT=${RESTORE_REPORT:-}\n"
        + _COMMON
        + r"""want=${RESTORE_BACKUP:-latest}
if [ "$want" = latest ]; then
    name=$(backups | tail -n 1)
    [ -n "$name" ] || die "no backup in $root"
else
    is_backup "$want" || die "'$want' is not 'latest' nor a backup's name (YYYYMMDDTHHMMSSZ)"
    name=$want
fi
dir="$root/$name"
for part in globals.sql roles databases; do
    [ -f "$dir/$part" ] || die "backup $name is missing or incomplete (no $part in $dir)"
done
roles=$(cat "$dir/roles")
databases=$(cat "$dir/databases")
for role in $roles; do valid_name "$role" || die "backup $name names an invalid role '$role'"; done
for db in $databases; do
    valid_name "$db" || die "backup $name names an invalid database '$db'"
    [ -f "$dir/$db.dump" ] || die "backup $name is incomplete (no $db.dump)"
done
admin_db=${PGDATABASE:-postgres}
q() { psql -X -q -t -A -v ON_ERROR_STOP=1 --dbname="$admin_db" "$@"; }
list() { printf "'%s'," "$@" | sed 's/,$//'; }
present=$(q -c "SELECT string_agg(datname, ' ') FROM pg_database WHERE datname IN ($(list $databases))")
present="$present $(q -c "SELECT string_agg(rolname, ' ') FROM pg_roles WHERE rolname IN ($(list $roles))")"
present=$(echo $present)
[ -z "$present" ] \
    || die "the server already has $present: a restore needs a server without the stack's databases and roles"
# Only the stack's roles, and of pg_dumpall's lines for them only the two plain shapes (a line with more in it
# is not run); their attributes are then the provisioner's, whatever the file says.
statements=$(for role in $roles; do
    grep -E "^(CREATE ROLE \"?$role\"?|ALTER ROLE \"?$role\"? WITH( [A-Z]+)+);$" "$dir/globals.sql" || true
    echo "ALTER ROLE \"$role\" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;"
done)
for role in $roles; do
    printf '%s\n' "$statements" | grep -Eq "^CREATE ROLE \"?$role\"?;" || die "backup $name has no role $role"
done
{ echo 'BEGIN;'; printf '%s\n' "$statements"; echo 'COMMIT;'; } | q
for db in $databases; do
    pg_restore --create --exit-on-error --dbname="$admin_db" "$dir/$db.dump" \
        || die "pg_restore of $db: see the lines above"
    case "$db" in *shared_queue) q -c "COMMENT ON DATABASE \"$db\" IS NULL" ;; esac
done
instances=$(printf '%s\n' $databases | grep -Ec 'singularity_[0-9]+$' || true)
report=$(printf '{"restored": "%s", "databases": %s, "instances": %s}' \
    "$name" "$(printf '%s\n' $databases | wc -l)" "$instances")
if [ -n "$REPORT" ]; then printf '%s\n' "$report" > "$REPORT"; fi
printf '%s\n' "$report"
"""
    )


def libpq_environment(admin_dsn: str) -> dict[str, str]:
    """The PG* variables that make the client tools connect as `admin_dsn` does."""
    names = {
        "host": "PGHOST",
        "port": "PGPORT",
        "user": "PGUSER",
        "password": "PGPASSWORD",
        "dbname": "PGDATABASE",
        "sslmode": "PGSSLMODE",
        "connect_timeout": "PGCONNECT_TIMEOUT",
    }
    params = conninfo_to_dict(admin_dsn)
    return {names[k]: str(v) for k, v in params.items() if k in names and v is not None}


def dump_environment(layout: StackLayout, root: str, retention: int, report: str = "") -> dict[str, str]:
    return {
        "BACKUP_ROOT": root,
        "BACKUP_DATABASES": " ".join(stack_databases(layout)),
        "BACKUP_ROLES": " ".join(stack_roles(layout)),
        "BACKUP_RETENTION": str(retention),
        "BACKUP_PREFIX": layout.prefix,
        "BACKUP_INSTANCES": str(layout.instances),
        "BACKUP_REPORT": report,
    }


@dataclass(frozen=True)
class ScriptRun:
    report: dict[str, object]  # the script's JSON line
    log: str  # what it said on stderr


def run_script(script: str, env: Mapping[str, str], tools: Path | None = None) -> ScriptRun:
    """Run a script built here; `tools`: the directory of pg_dump, pg_restore and psql (else PATH's)."""
    import os

    full = {**os.environ, **env}
    if tools is not None:
        full["PATH"] = f"{tools}{os.pathsep}{full.get('PATH', '')}"
    done = subprocess.run(["sh", "-c", script], env=full, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        failed = [line for line in lines if line.startswith(("backup failed: ", "restore failed: "))]
        said = [line for line in lines if line not in failed]  # the client tools' own lines: their error first
        detail = [line for line in said if "error" in line.lower()][-1:] or said[-1:]
        raise BackupError(" ".join([*(failed[-1:] or ["failed"]), *(f"({d.strip()})" for d in detail)]))
    last = done.stdout.strip().splitlines()[-1]
    return ScriptRun(json.loads(last), done.stderr)


def backup_layout(root: Path, name: str) -> tuple[str, StackLayout]:
    """(the backup's name, "latest" resolved; the layout it was taken of), from its `stack.json`."""
    check_backup_name(name)
    if name == LATEST:
        found = sorted(p.name for p in root.iterdir() if BACKUP_NAME.fullmatch(p.name)) if root.is_dir() else []
        if not found:
            raise BackupError(f"no backup in {root}")
        name = found[-1]
    try:
        described = json.loads((root / name / "stack.json").read_text())
        return name, StackLayout(int(described["instances"]), str(described["prefix"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BackupError(f"backup {name} in {root} is missing or incomplete ({error})") from error


def passwordless_roles(admin_dsn: str, layout: StackLayout) -> list[str]:
    """The stack's roles that exist without a password (what a restore leaves); needs a superuser."""
    with psycopg.connect(admin_dsn) as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_authid WHERE rolname = ANY(%s) AND rolpassword IS NULL ORDER BY rolname",
            (stack_roles(layout),),
        ).fetchall()
    return [row[0] for row in rows]


def set_passwords(admin_dsn: str, passwords: Mapping[str, str]) -> None:
    """Give roles their passwords (keep the passwords first: this is the only place they are set)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for role, password in passwords.items():
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
