"""Bringing a stack's pgmq up to the version this image ships, with its queues and messages intact.

- Installed as an extension: `ALTER EXTENSION pgmq UPDATE TO '<packaged>'` when the server has an update
  path to it; otherwise nothing can be done from here and `PgmqUpgradeRequired` says what to run.
- Installed from SQL (the PyPI package's script, which has no upgrade scripts): the old schema is moved
  aside, the packaged SQL installed, every queue re-created as its owner and its messages and archive
  copied with their ids, read counts and visibility times, the sequences carried on, then the old schema
  dropped — one transaction, so it either all happens or nothing does. In-flight messages keep their
  msg_id and vt: a consumer that read one before the upgrade deletes or archives it after. Partitioned
  queues (pg_partman) and installs whose version is not recorded are not touched automatically.
- A newer pgmq than the packaged one is left alone.

The sender stamps (queues.py) are carried over without marking copied requests unvouched: they were
stamped by the same trigger on the old table. Privileges, notifications and stamps are then (re)applied
by `ensure_queues` as on every provisioning run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from pgmq.install import get_embedded_install_sql, get_embedded_sql_version
from psycopg import sql

from singularity_stack.postgres.pgmq_install import SQL_INSTALL_MARK, PgmqInstall
from singularity_stack.provision import privileges
from singularity_stack.provision.errors import PgmqUpgradeRequired, ProvisionError
from singularity_stack.provision.queues import SENDER_TRIGGER, ensure_sender_stamps
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)

ASIDE = "pgmq_before_upgrade"
LOCK_TIMEOUT = "15s"  # waiting longer than this for in-flight transactions: give up, try again next run


@dataclass(frozen=True)
class QueueCopy:
    name: str
    owner: str
    unlogged: bool
    stamped: bool  # the old request table had the sender-stamp trigger


def packaged_version() -> str:
    return get_embedded_sql_version()


def _version(text: str) -> tuple[int, ...] | None:
    """'1.11.1' -> (1, 11, 1); None for anything else (pgmq releases are plain dotted numbers)."""
    parts = text.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


def _older(installed: str, packaged: str) -> bool | None:
    """installed < packaged; None when the installed version cannot be read."""
    mine, theirs = _version(installed), _version(packaged)
    return None if mine is None or theirs is None else mine < theirs


def ensure_current_pgmq(conn: psycopg.Connection, layout: StackLayout, installed: PgmqInstall) -> PgmqInstall:
    """Upgrade `installed` to the packaged pgmq if it is older; returns what is installed afterwards.

    Raises PgmqUpgradeRequired when it is older and no safe automatic upgrade exists. The caller commits.
    """
    packaged = packaged_version()
    older = _older(installed.version, packaged)
    if older is False:
        if installed.version != packaged:
            log.info("pgmq %s is newer than the packaged %s: left as it is", installed.version, packaged)
        return installed
    database = layout.shared_queue_database
    if installed.method == "extension":
        return _update_extension(conn, installed, packaged, database)
    if older is None:
        raise PgmqUpgradeRequired(
            f"pgmq in {database} was installed from SQL without a recorded version",
            f"check its version, then record it with COMMENT ON SCHEMA pgmq IS 'pgmq <version> {SQL_INSTALL_MARK}' "
            "and provision again",
        )
    partitioned = conn.execute("SELECT count(*) FROM pgmq.meta WHERE is_partitioned").fetchone()
    if partitioned and partitioned[0]:
        raise PgmqUpgradeRequired(
            f"{partitioned[0]} partitioned queue(s) in {database} (pg_partman): their partitions are not copied "
            "automatically",
            f"move their messages to plain queues, drop them, and provision again (pgmq {installed.version} -> "
            f"{packaged})",
        )
    _swap_sql_install(conn, layout, installed.version, packaged)
    log.info("pgmq upgraded from %s to %s (SQL install)", installed.version, packaged)
    return PgmqInstall("sql", packaged, False)


def _update_extension(conn: psycopg.Connection, installed: PgmqInstall, packaged: str, database: str) -> PgmqInstall:
    path = conn.execute(
        "SELECT path FROM pg_extension_update_paths('pgmq') WHERE source = %s AND target = %s AND path IS NOT NULL",
        (installed.version, packaged),
    ).fetchone()
    if path is None:
        raise PgmqUpgradeRequired(
            f"pgmq {installed.version} is installed as an extension in {database} and the server has no update "
            f"script to {packaged}",
            f"install pgmq {packaged}'s extension files (with its upgrade scripts) on the server, then run "
            f"ALTER EXTENSION pgmq UPDATE TO '{packaged}' in database {database}",
        )
    conn.execute(sql.SQL("ALTER EXTENSION pgmq UPDATE TO {}").format(sql.Literal(packaged)))
    log.info("pgmq extension updated from %s to %s (%s)", installed.version, packaged, path[0])
    return PgmqInstall("extension", packaged, False)


def _queues(conn: psycopg.Connection) -> list[QueueCopy]:
    rows = conn.execute(
        """
        SELECT m.queue_name, pg_get_userbyid(c.relowner), m.is_unlogged,
               EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = %s)
        FROM pgmq.meta m JOIN pg_class c ON c.oid = format('pgmq.%%I', 'q_' || m.queue_name)::regclass
        ORDER BY m.queue_name
        """,
        (SENDER_TRIGGER,),
    ).fetchall()
    return [QueueCopy(name, owner, unlogged, stamped) for name, owner, unlogged, stamped in rows]


def _common_columns(conn: psycopg.Connection, table: str) -> list[str]:
    """Columns of `table` in both schemas (generated ones excluded: they cannot be written)."""
    rows = conn.execute(
        """
        SELECT new.column_name FROM information_schema.columns new
        JOIN information_schema.columns old
          ON old.table_schema = %s AND old.table_name = new.table_name AND old.column_name = new.column_name
        WHERE new.table_schema = 'pgmq' AND new.table_name = %s AND new.is_generated = 'NEVER'
        ORDER BY new.ordinal_position
        """,
        (ASIDE, table),
    ).fetchall()
    return [row[0] for row in rows]


def _copy(conn: psycopg.Connection, table: str) -> None:
    columns = sql.SQL(", ").join(map(sql.Identifier, _common_columns(conn, table)))
    conn.execute(
        sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}").format(
            sql.Identifier("pgmq", table), columns, columns, sql.Identifier(ASIDE, table)
        )
    )


def _carry_sequence(conn: psycopg.Connection, queue: str) -> None:
    """The new queue's msg_id goes on from the old one's: ids are never reused, even of deleted messages."""
    old = conn.execute(
        "SELECT last_value FROM pg_sequences WHERE schemaname = %s AND sequencename = %s",
        (ASIDE, f"q_{queue}_msg_id_seq"),
    ).fetchone()
    if old is None or old[0] is None:
        return
    conn.execute(
        "SELECT setval(pg_get_serial_sequence(format('pgmq.%%I', %s::text), 'msg_id'), %s, true)",
        (f"q_{queue}", old[0]),
    )


def _carry_grants(conn: psycopg.Connection, table: str, owner: str) -> None:
    """The old table's grants (table and column level) on the new one, granted by its owner: queues outside
    the layout (a team's own) keep who may use them; the layout's are re-applied by ensure_queues anyway."""
    rows = conn.execute(
        """
        SELECT NULL::text, a.privilege_type, pg_get_userbyid(a.grantee)
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = format('%%I.%%I', %s::text, %s::text)::regclass AND a.grantee <> 0
          AND pg_get_userbyid(a.grantee) <> %s
        UNION ALL
        SELECT att.attname::text, a.privilege_type, pg_get_userbyid(a.grantee)
        FROM pg_attribute att, aclexplode(att.attacl) a
        WHERE att.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND a.grantee <> 0
          AND pg_get_userbyid(a.grantee) <> %s
        """,
        (ASIDE, table, owner, ASIDE, table, owner),
    ).fetchall()
    for column, privilege, grantee in rows:
        target = sql.Identifier("pgmq", table)
        what = (
            sql.SQL(privilege)
            if column is None
            else sql.SQL("{} ({})").format(sql.SQL(privilege), sql.Identifier(column))
        )
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(what, target, sql.Identifier(grantee)))


def _lock_old_tables(conn: psycopg.Connection, queues: list[QueueCopy], old: str, new: str) -> None:
    """Hold every old queue and archive table still (ACCESS EXCLUSIVE) before anything is copied.

    Without it a message sent, read or archived by a service between the copy and the DROP would land in
    the old table only and be dropped with it. Services wait for the swap (at most LOCK_TIMEOUT for it
    to get its locks) and then resolve pgmq.* to the new tables. When the locks cannot be had in time
    (long transactions on the queues) or a deadlock with a service's transaction, nothing has changed and
    the next provisioning run tries again."""
    tables = [sql.Identifier("pgmq", "meta")]
    for queue in queues:
        tables += [sql.Identifier("pgmq", f"q_{queue.name}"), sql.Identifier("pgmq", f"a_{queue.name}")]
    try:
        with conn.transaction():  # a savepoint: the caller's transaction is not left aborted by an error here
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.SQL(", ").join(tables)))
    except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as error:
        raise ProvisionError(
            f"pgmq upgrade {old} -> {new} postponed: could not lock the queue tables within {LOCK_TIMEOUT} "
            f"({type(error).__name__}: transactions on the queues held them); nothing was changed, the next "
            "provisioning run tries again"
        ) from error


def _swap_sql_install(conn: psycopg.Connection, layout: StackLayout, old: str, new: str) -> None:
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
    queues = _queues(conn)
    _lock_old_tables(conn, queues, old, new)
    conn.execute(sql.SQL("ALTER SCHEMA pgmq RENAME TO {}").format(sql.Identifier(ASIDE)))
    conn.execute(get_embedded_install_sql())
    conn.execute(sql.SQL("COMMENT ON SCHEMA pgmq IS {}").format(sql.Literal(f"pgmq {new} {SQL_INSTALL_MARK}")))
    for statement in privileges.schema_statements(layout):  # the owner must be able to create the queues again
        conn.execute(statement)
    topics = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{ASIDE}.topic_bindings",)).fetchone()
    if topics and topics[0]:
        _copy(conn, "topic_bindings")
    notifying: dict[str, int] = {}
    throttle = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{ASIDE}.notify_insert_throttle",)).fetchone()
    if throttle and throttle[0]:
        notifying = dict(
            conn.execute(
                sql.SQL("SELECT queue_name, throttle_interval_ms FROM {}").format(
                    sql.Identifier(ASIDE, "notify_insert_throttle")
                )
            ).fetchall()
        )
    for queue in queues:
        # As the queue's owner (CentralCloud), so grants on it stay the owner's.
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(queue.owner)))
        create = "SELECT pgmq.create_unlogged(%s)" if queue.unlogged else "SELECT pgmq.create(%s)"
        conn.execute(create, (queue.name,))
        _copy(conn, f"q_{queue.name}")
        _copy(conn, f"a_{queue.name}")
        _carry_sequence(conn, queue.name)
        _carry_grants(conn, f"q_{queue.name}", queue.owner)
        _carry_grants(conn, f"a_{queue.name}", queue.owner)
        if queue.name in notifying:
            conn.execute("SELECT pgmq.enable_notify_insert(%s, %s)", (queue.name, notifying[queue.name]))
        conn.execute("RESET ROLE")
    # The stamp trigger goes on after the copy (it would re-stamp every copied message with our login);
    # only requests the old table never stamped are marked unvouched.
    stamped = {q.name for q in queues if q.stamped}
    owners = {q.owner for q in queues}
    if len(owners) == 1:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owners.pop())))
    ensure_sender_stamps(conn, layout, already_stamped=stamped)
    conn.execute("RESET ROLE")
    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(ASIDE)))
    log.info("pgmq %s -> %s: %d queues copied", old, new, len(queues))
