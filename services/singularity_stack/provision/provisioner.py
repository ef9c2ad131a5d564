"""Create a stack's databases, roles, pgmq, queues, privileges and schemas: idempotently.

Running it again changes nothing and never changes an existing password; a larger instance
count adds only the new instances, a smaller one drops nothing: the instances above it keep their
databases, roles, reply queues and grants (retired, as the operator's Retain policy keeps them;
`deprovision.drop_instance` removes one), so raising the count again finds them as they were.
Isolation is enforced by PostgreSQL: CONNECT is revoked from PUBLIC on every database, each role
owns its own database and reaches `shared_queue` only through the queue privileges of `privileges.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from singularity_stack.postgres.pgmq_install import Method, PgmqInstall, ensure_pgmq
from singularity_stack.provision import privileges
from singularity_stack.provision.credentials import ServiceCredentials, generate_password, postgres_url
from singularity_stack.provision.errors import ProvisionError as ProvisionError  # re-exported: callers import it here
from singularity_stack.provision.errors import failing
from singularity_stack.provision.migrations import applied_migrations, migrate, service_kind
from singularity_stack.provision.parallel import Task, on_connections
from singularity_stack.provision.pgmq_upgrade import ensure_current_pgmq
from singularity_stack.provision.queues import create_queues, ensure_queues
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)
# Databases created, queue batches created and databases migrated at once. The provisioner has at most
# WORKERS + 1 connections open (the workers' and one that coordinates them): 5 of budget.HEADROOM's 10.
WORKERS = 4
MIGRATION_WORKERS = WORKERS
MAX_CONNECTIONS = WORKERS + 1
QUEUE_CHUNK = 64  # queues per transaction on a worker (a stack of N instances has 8 N + 8)


@dataclass
class ProvisionResult:
    layout: StackLayout
    credentials: dict[str, ServiceCredentials]
    passwords: dict[str, str]
    pgmq: PgmqInstall
    changes: list[str] = field(default_factory=list)
    migrations: dict[str, list[str]] = field(default_factory=dict)  # applied by this run, per logical owner
    # Every migration each database records as applied (its _yoyo_migration), whoever applied it.
    applied: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


def endpoint_of(dsn: str) -> Endpoint:
    parts = urlsplit(dsn)
    return Endpoint(parts.hostname or "localhost", parts.port or 5432)


def with_database(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return parts._replace(path="/" + dbname).geturl()


OWNER_MARK = "singularity-stack "


def recorded_owner(conn: psycopg.Connection, layout: StackLayout) -> str | None:
    """The stack recorded on the shared_queue database, if any."""
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (layout.shared_queue_database,),
    ).fetchone()
    comment = (row[0] or "") if row else ""
    return comment[len(OWNER_MARK) :] if comment.startswith(OWNER_MARK) else None


def check_owner(conn: psycopg.Connection, layout: StackLayout, owner: str) -> None:
    """Refuse to touch databases another stack made under the same names."""
    recorded = recorded_owner(conn, layout)
    if recorded is not None and recorded != owner:
        raise ProvisionError(
            f"the databases and roles {layout.prefix}* on this server belong to stack {recorded}, whose names are "
            f"the same as {owner}'s: rename one of the stacks or use another server; nothing was changed"
        )


class Provisioner:
    def __init__(
        self,
        admin_dsn: str,
        layout: StackLayout,
        *,
        known_passwords: Mapping[str, str] | None = None,
        rotate: Iterable[str] = (),
        public_endpoint: Endpoint | None = None,
        pgmq_method: Method | None = None,
        report: Callable[[str], None] | None = None,
        persist: Callable[[dict[str, ServiceCredentials]], None] | None = None,
        owner: str | None = None,
        migrate: bool | Collection[str] = True,
    ) -> None:
        self.admin_dsn = admin_dsn
        self.layout = layout
        self.passwords = dict(known_passwords or {})
        self.rotate = set(rotate)
        # Where the services reach Postgres (e.g. a Kubernetes Service), if not where we do.
        self.admin_endpoint = endpoint_of(admin_dsn)
        self.public_endpoint = public_endpoint or self.admin_endpoint
        self.pgmq_method = pgmq_method
        self.report = report or (lambda line: log.info("%s", line))
        # Called as soon as passwords exist, so a failure in a later step never loses one.
        self.persist = persist
        self.changes: list[str] = []
        # Who the stack is ("<namespace>/<name>"): recorded on its shared_queue database. Two stacks whose
        # prefixes are equal ("team-a"/"x" and "team"/"a-x" both make team_a_x_) must not share databases.
        self.owner = owner
        # Which service databases get this package's migrations: all (`up`, the CLI), none, or only the
        # named logical owners (the operator: new databases; the others are migrated by their image's Job).
        self.migrate = migrate
        self._created: set[str] = set()  # the databases this run created

    def _changed(self, what: str) -> None:
        self.changes.append(what)
        self.report(what)

    # -- roles and databases (autocommit: CREATE DATABASE cannot run in a transaction) ---------------

    def _role_statement(self, role: str, exists: bool) -> sql.Composed | None:
        """The CREATE or ALTER (a rotated password) a role needs; None when it has what it should."""
        if exists and role not in self.rotate:
            if role not in self.passwords:
                raise ProvisionError(
                    f"role {role} exists but its password is not known: pass the credentials file that holds it, "
                    f"or set a new one with --rotate-password {role}"
                )
            return None
        password = generate_password() if role in self.rotate or role not in self.passwords else self.passwords[role]
        self.passwords[role] = password
        verb = "ALTER" if exists else "CREATE"
        return sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)
        )

    def _ensure_roles(self, conn: psycopg.Connection) -> None:
        """Every role, in one round trip and one transaction (a multi-statement query): all are made, or none."""
        roles = [self.layout.role(logical) for logical in self.layout.owners] + [self.layout.analytics_role]
        existing = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (roles,))}
        statements = {role: self._role_statement(role, role in existing) for role in roles}
        todo = {role: statement for role, statement in statements.items() if statement is not None}
        if not todo:
            return
        names = list(todo)
        which = ", ".join(names) if len(names) <= 3 else f"{len(names)} roles ({names[0]} .. {names[-1]})"
        with failing(f"creating or altering {which}"):
            conn.execute(sql.SQL("; ").join(todo.values()))
        for role in todo:
            self._changed(f"{'rotated password of' if role in existing else 'created'} role {role}")

    @staticmethod
    def _create_database(database: str, owner: str) -> Task[None]:
        """No STRATEGY: PostgreSQL 15's default WAL_LOG. FILE_COPY was no faster at 4 connections with fsync on
        (8x slower one at a time), and it forces two checkpoints per database on a server that may be serving."""

        def create(conn: psycopg.Connection) -> None:
            with failing(f"creating database {database}"):
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(owner))
                )
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))

        return create

    def _plan_new_passwords(self) -> None:
        """A password for every role still to be created, chosen before any is: `persist` can then keep them
        first, and a run that dies between CREATE ROLE and saving the credentials loses no password."""
        roles = [self.layout.role(logical) for logical in self.layout.owners] + [self.layout.analytics_role]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            if self.owner is not None:  # another stack's databases under the same names: say so, write nothing
                check_owner(conn, self.layout, self.owner)
            existing = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (roles,))}
        for role in roles:
            if role in self.passwords:
                continue
            if role in existing and role not in self.rotate:
                raise ProvisionError(
                    f"role {role} exists but its password is not known: pass the credentials file that holds it, "
                    f"or set a new one with --rotate-password {role}"
                )
            self.passwords[role] = generate_password()  # a new role's, or a lost one about to be set anew

    def _roles_and_databases(self) -> None:
        """The roles, then shared_queue (with its grants and owner mark) on one connection; then the other
        databases, WORKERS at a time: CREATE DATABASE is most of the time a new stack takes, and copies of
        template1 made side by side do not wait for each other."""
        layout = self.layout
        shared = layout.shared_queue_database
        owners = {shared: layout.role("centralcloud"), **{layout.database(o): layout.role(o) for o in layout.owners}}
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            self._ensure_roles(conn)
            # each database that exists, and whether PUBLIC still has a privilege on it (NULL: the default ones)
            found: dict[str, bool] = dict(
                conn.execute(
                    "SELECT datname, datacl IS NULL OR EXISTS (SELECT FROM aclexplode(datacl) a WHERE a.grantee = 0)"
                    " FROM pg_database WHERE datname = ANY(%s)",
                    (list(owners),),
                ).fetchall()
            )
            if shared not in found:
                self._create_database(shared, owners[shared])(conn)
                self._created.add(shared)
                self._changed(f"created database {shared}")
            public = [name for name, granted in found.items() if granted]
            if public:
                with failing(f"revoking PUBLIC's privileges on {', '.join(public)}"):
                    conn.execute(
                        sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
                            sql.SQL(", ").join(map(sql.Identifier, public))
                        )
                    )
            members = [layout.role(r) for r in layout.owners] + [layout.analytics_role]
            # only what is not there yet: a GRANT or COMMENT rewrites the database's catalog row even when it
            # changes nothing, and a rerun should write nothing
            lacking = [
                r[0]
                for r in conn.execute(
                    "SELECT m FROM unnest(%s::text[]) AS m WHERE NOT has_database_privilege(m, %s, 'CONNECT')",
                    (members, shared),
                )
            ]
            with failing(f"granting CONNECT on {shared}"):
                if lacking:
                    conn.execute(
                        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                            sql.Identifier(shared), sql.SQL(", ").join(map(sql.Identifier, lacking))
                        )
                    )
                # only now: the roles' passwords were known, so the stack is ours
                if self.owner is not None and recorded_owner(conn, layout) != self.owner:
                    conn.execute(
                        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                            sql.Identifier(shared), sql.Literal(OWNER_MARK + self.owner)
                        )
                    )
        missing = [name for name in owners if name not in found and name != shared]
        on_connections(self.admin_dsn, [self._create_database(name, owners[name]) for name in missing], WORKERS)
        for name in missing:  # in the layout's order, as one at a time would
            self._created.add(name)
            self._changed(f"created database {name}")

    # -- shared_queue: pgmq, queues owned by CentralCloud, privileges --------------------------------

    def _create_queues(self, conn: psycopg.Connection, dsn: str) -> list[str]:
        """The missing queues, QUEUE_CHUNK per transaction on WORKERS connections (each queue is two tables and
        their indexes: thousands of them for a large stack); returns those created. Few are left to ensure_queues."""
        layout = self.layout
        existing = {r[0] for r in conn.execute("SELECT queue_name FROM pgmq.meta")}
        conn.commit()
        missing = [queue for queue in layout.queues if queue not in existing]
        if len(missing) <= QUEUE_CHUNK:
            return []
        work, owner = set(layout.work_queues), sql.Identifier(layout.role("centralcloud"))

        def create(chunk: list[str]) -> Task[None]:
            def run(worker: psycopg.Connection) -> None:
                with failing(f"creating the queues {chunk[0]} .. {chunk[-1]}"), worker.transaction():
                    worker.execute(sql.SQL("SET LOCAL ROLE {}").format(owner))  # CentralCloud owns every queue
                    create_queues(worker, chunk, [queue for queue in chunk if queue in work])

            return run

        # Contiguous runs in the layout's order: pgmq locks each queue it creates, and every creator (CentralCloud
        # at its start too) takes them in that order, so none waits on another in a cycle.
        chunks = [missing[i : i + QUEUE_CHUNK] for i in range(0, len(missing), QUEUE_CHUNK)]
        on_connections(dsn, [create(chunk) for chunk in chunks], WORKERS, "queues")
        return missing

    def _shared_queue(self) -> PgmqInstall:
        layout = self.layout
        dsn = with_database(self.admin_dsn, layout.shared_queue_database)
        with psycopg.connect(dsn) as conn:
            with failing(f"installing pgmq in {layout.shared_queue_database}"):
                installed = ensure_pgmq(conn, prefer=self.pgmq_method)
            upgraded = False
            if installed.newly_installed:
                self._changed(f"installed pgmq {installed.version} ({installed.method})")
            else:
                # In the same transaction as the privileges and queues below: all of it lands, or none.
                current = ensure_current_pgmq(conn, layout, installed)
                upgraded = current.version != installed.version
                if upgraded:
                    self._changed(f"upgraded pgmq {installed.version} -> {current.version} ({installed.method})")
                installed = current
            with failing(f"setting up the queues in {layout.shared_queue_database}"):
                for statement in privileges.schema_statements(layout):
                    conn.execute(statement)
                # Without an upgrade to land with them, the new queues are made a few transactions at a time.
                created = [] if upgraded else self._create_queues(conn, dsn)
                conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(layout.role("centralcloud"))))
                created += ensure_queues(conn, layout)
                conn.execute("RESET ROLE")
                conn.commit()
            for queue in sorted(created, key=layout.queues.index):
                self._changed(f"created queue {queue}")
            return installed

    # -- results -------------------------------------------------------------------------------------

    def _url(self, role: str, database: str, endpoint: Endpoint) -> str:
        return postgres_url(role, self.passwords[role], endpoint.host, endpoint.port, database)

    def credentials(self, endpoint: Endpoint | None = None) -> dict[str, ServiceCredentials]:
        """Each service's URLs, pointing at `endpoint` (default: where the services reach Postgres)."""
        where = endpoint or self.public_endpoint
        layout = self.layout
        result = {}
        for logical in layout.owners:
            role = layout.role(logical)
            result[logical] = ServiceCredentials(
                database_url=self._url(role, layout.database(logical), where),
                shared_queue_url=self._url(role, layout.shared_queue_database, where),
            )
        result["centralcloud"].shared_queue_analytics_url = self._url(
            layout.analytics_role, layout.shared_queue_database, where
        )
        return result

    def _migrates(self, logical: str) -> bool:
        return self.migrate if isinstance(self.migrate, bool) else logical in self.migrate

    def _migrate_one(self, logical: str, database_url: str) -> tuple[list[str] | None, list[str]]:
        """(the migrations applied now, None when this database is not ours to migrate; all it records)."""
        if self._migrates(logical):
            return migrate(service_kind(logical), database_url)
        if self.layout.database(logical) in self._created:  # made by this run: nothing to read
            return None, []
        return None, applied_migrations(database_url)

    def _migrate(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(applied now, applied in all) per logical owner. The databases are independent (each its own role's,
        each migration under yoyo's lock in its own database): a few at a time, on MIGRATION_WORKERS
        connections, within the budget's headroom. Reported in the layout's order, as one at a time would."""
        urls = {logical: creds.database_url for logical, creds in self.credentials(self.admin_endpoint).items()}
        workers = min(MIGRATION_WORKERS, len(urls)) or 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="migrate") as pool:
            futures = {logical: pool.submit(self._migrate_one, logical, url) for logical, url in urls.items()}
            now, applied = {}, {}
            for logical, future in futures.items():  # a failure is raised after the ones before it are reported
                try:
                    done, recorded = future.result()
                except BaseException:
                    for pending in futures.values():  # those not started yet are not started at all
                        pending.cancel()
                    raise
                if done is not None:
                    if done:
                        self._changed(f"migrated {self.layout.database(logical)}: {', '.join(done)}")
                    now[logical] = done
                applied[logical] = recorded
        return now, applied

    def run(self) -> ProvisionResult:
        self._plan_new_passwords()
        if self.persist:  # before the roles exist: their passwords are never only in this process
            self.persist(self.credentials())
        self._roles_and_databases()
        if self.persist and self.rotate:  # rotated passwords are known only now
            self.persist(self.credentials())
        installed = self._shared_queue()
        migrations, applied = self._migrate()
        return ProvisionResult(
            self.layout, self.credentials(), dict(self.passwords), installed, self.changes, migrations, applied
        )
